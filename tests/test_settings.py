"""Settings come from the environment; processes refuse to start without their backends."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.backends import redact_url

ROOT = Path(__file__).resolve().parent.parent


def run_python(code, **env):
    base = {key: value for key, value in os.environ.items() if key not in {"SECRET_KEY", "DEBUG"}}
    base["CAO_ENV_FILE"] = ""  # a developer's .env must not fill in what the test leaves out
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_secret_key_is_required_when_debug_is_off():
    result = run_python("import cao_project.settings")

    assert result.returncode != 0
    assert "SECRET_KEY is required when DEBUG is off" in result.stderr


def test_debug_allows_a_local_secret_key():
    result = run_python("import cao_project.settings as s; print(s.DEBUG, bool(s.SECRET_KEY))", DEBUG="true")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True True"


def test_defaults_point_at_local_backends_and_brief_values():
    result = run_python(
        "import cao_project.settings as s; print(s.DATABASE_URL, s.REDIS_URL, s.HTTP_CONNECT_TIMEOUT_S, "
        "s.HTTP_READ_TIMEOUT_S, s.JOB_STUCK_SECONDS, s.SANITY_CHECK_INTERVAL_SECONDS, repr(s.INTERNAL_API_KEY), "
        "s.CAO_QUEUES)",
        SECRET_KEY="x",
        DATABASE_URL="",
        REDIS_URL="",
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split(" ", 6) == [
        "postgresql://postgres@127.0.0.1:5432/cao",
        "redis://127.0.0.1:6379/0",
        "3.0", "30.0", "7200", "60.0", "'' ['heavy', 'medium', 'default']\n",
    ]


def test_service_url_env_vars_override_and_other_urls_do_not():
    result = run_python(
        "import cao_project.settings as s; print(sorted(s.CAO_SERVICE_URL_OVERRIDES.items()))",
        SECRET_KEY="x",
        FAST_CHAT_LLM_URL="http://llm.internal:8080",
        DATABASE_URL="postgresql://postgres@127.0.0.1:5432/cao",
    )

    assert result.returncode == 0, result.stderr
    assert "('fast_chat_llm', 'http://llm.internal:8080')" in result.stdout
    assert "database" not in result.stdout


def test_malformed_numbers_are_reported_by_name():
    result = run_python("import cao_project.settings", SECRET_KEY="x", HTTP_READ_TIMEOUT_S="soon")

    assert result.returncode != 0
    assert "HTTP_READ_TIMEOUT_S must be a float, got 'soon'" in result.stderr


@pytest.mark.parametrize(
    "url, shown",
    [
        ("postgresql://cao:hunter2@db:5432/cao", "postgresql://cao:***@db:5432/cao"),
        ("redis://:hunter2@redis:6379/0", "redis://:***@redis:6379/0"),
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ],
)
def test_urls_are_shown_without_passwords(url, shown):
    assert redact_url(url) == shown


def test_a_process_without_postgresql_stops_naming_the_url_but_not_the_password():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='cao_project.settings'; django.setup();"
        "import cao_project.asgi",
        SECRET_KEY="x",
        DATABASE_URL="postgresql://cao:hunter2@127.0.0.1:1/cao",
        CAO_CHECK_BACKENDS_ON_START="true",
    )

    assert result.returncode != 0
    assert "PostgreSQL is not reachable at postgresql://cao:***@127.0.0.1:1/cao" in result.stderr
    assert "hunter2" not in result.stderr


def test_the_scheduler_without_redis_stops_naming_the_url():
    result = subprocess.run(
        [sys.executable, "manage.py", "run_scheduler", "--once"],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": "redis://:hunter2@127.0.0.1:1/0", "CAO_CHECK_BACKENDS_ON_START": "true"},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode != 0
    assert "Redis is not reachable at redis://:***@127.0.0.1:1/0" in result.stderr
    assert "hunter2" not in result.stderr
