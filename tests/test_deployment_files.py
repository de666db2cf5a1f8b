"""docker-compose.yml, the entrypoint and the Dockerfile, checked without a Docker engine."""

import os
import subprocess
from pathlib import Path

import yaml
from django.conf import settings

from services_registry import reference

ROOT = Path(__file__).resolve().parent.parent


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_every_service_of_the_stack():
    services = compose()["services"]

    assert set(services) == {
        "redis", "db", "api", "worker_heavy", "worker_medium", "worker_default", "beat", "simulator",
    }


def test_workers_are_pinned_to_one_queue_each():
    services = compose()["services"]

    for queue in settings.CAO_QUEUES:
        command = services[f"worker_{queue}"]["command"]
        assert command[:3] == ["python", "manage.py", "rundramatiq"]
        assert command[command.index("--queues") + 1] == queue
        assert "--threads" in command and "--processes" in command
        assert command.count("--queues") == 1
        # Green workers: calls in flight bounded by the services' limits, not by threads.
        assert "--use-gevent" in command


def test_app_services_point_at_compose_backends_and_the_simulator():
    services = compose()["services"]

    for name in ("api", "worker_heavy", "worker_medium", "worker_default", "beat"):
        env = services[name]["environment"]
        assert env["DATABASE_URL"].startswith("postgresql://") and "@db:5432/" in env["DATABASE_URL"]
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert env["SECRET_KEY"]
        for service_name, *_ in reference.SERVICES:
            assert f"http://simulator:9100/{service_name}" in env[f"{service_name.upper()}_URL"]
        assert services[name]["depends_on"]["db"]["condition"] == "service_healthy"
        # one metrics directory shared by the host's processes, so /metrics adds them up
        assert env["PROMETHEUS_MULTIPROC_DIR"] == "/var/lib/cao/metrics"
        assert "metrics:/var/lib/cao/metrics" in services[name]["volumes"]


def test_api_migrates_with_retries_and_the_scheduler_and_simulator_run_their_commands():
    services = compose()["services"]

    api = services["api"]
    assert api["command"] == ["api"]
    assert api["environment"]["RUN_MIGRATIONS_ON_STARTUP"] == "true"
    assert int(api["environment"]["MIGRATION_MAX_ATTEMPTS"]) >= 1
    assert float(api["environment"]["MIGRATION_RETRY_SLEEP_SECONDS"]) > 0
    assert services["beat"]["command"] == ["python", "manage.py", "run_scheduler"]
    assert services["simulator"]["command"][:3] == ["python", "manage.py", "simulate_services"]
    assert services["redis"]["command"][-4:] == ["--save", "", "--appendonly", "no"]


def test_commands_named_by_compose_exist():
    from django.core.management import get_commands

    commands = get_commands()
    for name in ("rundramatiq", "run_scheduler", "simulate_services", "migrate"):
        assert name in commands


def test_entrypoint_retries_migrations_then_gives_up(tmp_path):
    # A fake `python` that always fails stands in for an unreachable database.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text("#!/bin/sh\necho migrate-called >> \"$CALLS\"\nexit 1\n")
    (fake_bin / "python").chmod(0o755)
    calls = tmp_path / "calls"
    env = {
        **os.environ,
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
        "CALLS": str(calls),
        "MIGRATION_MAX_ATTEMPTS": "3",
        "MIGRATION_RETRY_SLEEP_SECONDS": "0",
        "RUN_MIGRATIONS_ON_STARTUP": "true",
    }

    result = subprocess.run(["sh", str(ROOT / "docker-entrypoint.sh"), "api"], env=env, capture_output=True, text=True)

    assert result.returncode == 1
    assert calls.read_text().count("migrate-called") == 3
    assert "giving up" in result.stderr


def test_entrypoint_runs_other_commands_as_given(tmp_path):
    result = subprocess.run(
        ["sh", str(ROOT / "docker-entrypoint.sh"), "echo", "hello"], capture_output=True, text=True
    )

    assert result.returncode == 0 and result.stdout.strip() == "hello"


def test_dockerfile_uses_the_entrypoint_and_pinned_requirements():
    dockerfile = (ROOT / "Dockerfile").read_text()

    assert "FROM python:3.11" in dockerfile
    assert "pip install -r requirements.txt" in dockerfile
    assert 'ENTRYPOINT ["/app/docker-entrypoint.sh"]' in dockerfile


def test_the_containers_api_cuts_open_streams_on_stop_as_the_local_stack_does():
    from scripts.stack import API_GRACEFUL_SHUTDOWN_S

    entrypoint = (ROOT / "docker-entrypoint.sh").read_text()
    assert f"--timeout-graceful-shutdown {API_GRACEFUL_SHUTDOWN_S} " in entrypoint
