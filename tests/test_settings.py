"""Settings come from the environment; processes refuse to start without their backends."""

import json
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


RENAMED_DURATIONS = [
    ("CAO_RECORD_RETRY_SECONDS", "CAO_RECORD_RETRY_S", "CAO_RECORD_RETRY_S"),
    ("CAO_WS_RESYNC_SECONDS", "CAO_WS_RESYNC_S", "CAO_WS_RESYNC_S"),
    ("CAO_SSE_KEEPALIVE_SECONDS", "CAO_SSE_KEEPALIVE_S", "CAO_SSE_KEEPALIVE_S"),
    ("CAO_REDISPATCH_GRACE_SECONDS", "CAO_REDISPATCH_GRACE_S", "CAO_REDISPATCH_GRACE_S"),
    ("CAO_DISPATCH_MARKER_TTL_SECONDS", "CAO_DISPATCH_MARKER_TTL_S", "CAO_DISPATCH_MARKER_TTL_S"),
    ("CAO_REGISTRY_CACHE_SECONDS", "CAO_REGISTRY_CACHE_S", "CAO_REGISTRY_CACHE_S"),
    ("CAO_API_KEY_CACHE_SECONDS", "CAO_API_KEY_CACHE_S", "CAO_API_KEY_CACHE_S"),
    ("CAO_HSTS_SECONDS", "CAO_HSTS_S", "SECURE_HSTS_SECONDS"),
]


@pytest.mark.parametrize("old, new, setting", RENAMED_DURATIONS)
def test_a_deprecated_duration_name_still_applies_with_a_warning(old, new, setting):
    result = run_python(f"import cao_project.settings as s; print(s.{setting})", DEBUG="true", **{old: "7", new: ""})

    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == 7
    assert f"{old} is deprecated" in result.stderr and new in result.stderr


@pytest.mark.parametrize("old, new, setting", RENAMED_DURATIONS)
def test_the_new_duration_name_wins_over_the_deprecated_one(old, new, setting):
    result = run_python(f"import cao_project.settings as s; print(s.{setting})", DEBUG="true", **{old: "7", new: "3"})

    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) == 3
    assert "deprecated" not in result.stderr


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


# --- Settings that change behaviour, read at import: checked in a process started with them ---------


def run_django(code, settings, **env):
    """Run ``code`` after django.setup() in a process started with ``env``, on this run's test database.

    ``code`` leaves its findings in a dict named ``out``; they come back decoded from JSON.
    """
    from django.db import connection

    from scripts.testbed import with_database

    script = "import django, json, os; django.setup(); out = {}\n" + code + "\nprint(json.dumps(out))"
    result = run_python(
        script,
        SECRET_KEY="x",
        DJANGO_SETTINGS_MODULE="cao_project.settings",
        DATABASE_URL=with_database(settings.DATABASE_URL, connection.settings_dict["NAME"]),
        ALLOWED_HOSTS="gw.example,testserver",
        **env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


MONITOR_URLS = """
from django.test import Client
client = Client(HTTP_X_API_KEY=os.environ["TEST_API_KEY"], HTTP_HOST="gw.example")
def monitor_url(**headers):
    response = client.post(
        "/api/v1/jobs", {"feature_name": "business_plan", "input_data": {}}, content_type="application/json", **headers
    )
    assert response.status_code == 201, response.content
    return response.json()["monitor_url"].split("/ws/")[0]
out["forwarded_https"] = monitor_url(HTTP_X_FORWARDED_PROTO="https")
out["forwarded_http"] = monitor_url(HTTP_X_FORWARDED_PROTO="http")
out["no_header"] = monitor_url()
"""


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "trust, expected",
    [
        ("true", {"forwarded_https": "wss://gw.example", "forwarded_http": "ws://gw.example", "no_header": "ws://gw.example"}),
        # Not trusted (the default): a client cannot make the gateway believe it came over TLS.
        ("", {"forwarded_https": "ws://gw.example", "forwarded_http": "ws://gw.example", "no_header": "ws://gw.example"}),
    ],
)
def test_behind_a_trusted_tls_proxy_monitor_url_is_wss(registry, client_key, settings, trust, expected):
    found = run_django(MONITOR_URLS, settings, CAO_TRUST_X_FORWARDED_PROTO=trust, TEST_API_KEY=client_key.raw_key)

    assert found == expected


COOKIES_AND_HSTS = """
from django.test import Client
client = Client()
login_page = client.get("/admin/login/", secure=True)
logged_in = client.post("/admin/login/", {"username": "ops", "password": "pw-for-tests"}, secure=True)
assert logged_in.status_code == 302, logged_in.content
out["csrf_cookie_secure"] = bool(login_page.cookies["csrftoken"]["secure"])
out["session_cookie_secure"] = bool(logged_in.cookies["sessionid"]["secure"])
out["session_cookie_httponly"] = bool(logged_in.cookies["sessionid"]["httponly"])
out["hsts_over_tls"] = client.get("/api/v1/health", secure=True).headers.get("Strict-Transport-Security")
out["hsts_over_http"] = client.get("/api/v1/health").headers.get("Strict-Transport-Security")
"""


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "env, expected",
    [
        (
            {"CAO_SECURE_COOKIES": "true", "CAO_HSTS_S": "31536000"},
            {"csrf_cookie_secure": True, "session_cookie_secure": True, "session_cookie_httponly": True,
             "hsts_over_tls": "max-age=31536000", "hsts_over_http": None},
        ),
        (
            {"CAO_SECURE_COOKIES": "", "CAO_HSTS_S": ""},  # the defaults: plain-HTTP local development
            {"csrf_cookie_secure": False, "session_cookie_secure": False, "session_cookie_httponly": True,
             "hsts_over_tls": None, "hsts_over_http": None},
        ),
    ],
)
def test_secure_cookies_and_hsts_follow_the_settings(django_user_model, settings, env, expected):
    django_user_model.objects.create_superuser("ops", "ops@example.com", "pw-for-tests")

    assert run_django(COOKIES_AND_HSTS, settings, **env) == expected


LOG_LINES = """
import logging
from common.logs import log_context
from django.conf import settings
settings.INTERNAL_API_KEY = "internal-7c1d"
with log_context(job_id="6f1c0d3e", step_index=2, service="summarizer_pro", attempt=3):
    logging.getLogger("orchestration.engine").warning("Step failed: %s", "sent internal-7c1d")
logging.getLogger("django.request").error("Outside any job.")
"""


def test_log_format_json_writes_one_object_per_line_with_the_job_fields():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'cao_project.settings'; django.setup()\n" + LOG_LINES,
        SECRET_KEY="x",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )

    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is a JSON object
    step, other = lines
    assert step["message"] == "Step failed: sent ***"
    assert (step["level"], step["logger"]) == ("WARNING", "orchestration.engine")
    assert (step["job_id"], step["step_index"], step["service"], step["attempt"]) == (
        "6f1c0d3e", 2, "summarizer_pro", 3,
    )
    assert step["timestamp"]
    assert (other["level"], other["logger"], other["message"]) == ("ERROR", "django.request", "Outside any job.")
    assert other["job_id"] is None and other["service"] is None


def test_the_readable_log_format_is_the_default_and_appends_the_job_fields():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE'] = 'cao_project.settings'; django.setup()\n" + LOG_LINES,
        SECRET_KEY="x",
        LOG_FORMAT="",
        LOG_LEVEL="INFO",
    )

    assert result.returncode == 0, result.stderr
    step, other = result.stderr.splitlines()
    assert step.endswith(
        "WARNING orchestration.engine Step failed: sent *** [job_id=6f1c0d3e step_index=2 service=summarizer_pro attempt=3]"
    )
    assert other.endswith("ERROR django.request Outside any job.")
