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
        "redis", "db", "api", "worker_heavy", "worker_medium", "worker_default", "worker_webhooks", "beat",
        "simulator",
    }


def test_workers_are_pinned_to_one_queue_each():
    services = compose()["services"]

    for queue in (*settings.CAO_QUEUES, settings.CAO_WEBHOOK_QUEUE):
        command = services[f"worker_{queue}"]["command"]
        assert command[:3] == ["python", "manage.py", "rundramatiq"]
        assert command[command.index("--queues") + 1] == queue
        assert "--threads" in command and "--processes" in command
        assert command.count("--queues") == 1
        # Green workers: calls in flight bounded by the services' limits, not by threads.
        assert "--use-gevent" in command


def test_app_services_point_at_compose_backends_and_the_simulator():
    services = compose()["services"]

    for name in ("api", "worker_heavy", "worker_medium", "worker_default", "worker_webhooks", "beat"):
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


def test_the_local_stack_starts_a_worker_for_every_queue_the_containers_do():
    from scripts.stack import stack_processes

    specs = stack_processes(python="python", host="127.0.0.1", port=8000, simulator_port=9100)
    local = {
        spec.command[spec.command.index("--queues") + 1] for spec in specs if "rundramatiq" in spec.command
    }
    containers = {
        service["command"][service["command"].index("--queues") + 1]
        for service in compose()["services"].values()
        if "rundramatiq" in service.get("command", [])
    }
    assert local == containers == {*settings.CAO_QUEUES, settings.CAO_WEBHOOK_QUEUE}


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


def test_the_api_serves_from_several_processes_when_web_concurrency_asks(tmp_path):
    # uvicorn's worker processes import the app inside their event loop; the
    # start-up check of the backends must still run (and pass) there.
    import signal
    import sys

    import requests

    from scripts.private_servers import free_port
    from scripts.stack import api_command
    from scripts.testbed import wait_until, with_database

    port = free_port()
    env = {
        **os.environ,
        "WEB_CONCURRENCY": "2",
        "CAO_CHECK_BACKENDS_ON_START": "true",
        "DATABASE_URL": with_database(settings.DATABASE_URL, "postgres"),
    }
    log = tmp_path / "api.log"
    with log.open("w") as output:
        server = subprocess.Popen(
            api_command(sys.executable, ROOT, "127.0.0.1", port), cwd=ROOT, env=env,
            stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def healthy():
        try:
            return requests.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def serving_processes():
        children = Path(f"/proc/{server.pid}/task/{server.pid}/children").read_text().split()
        # multiprocessing's resource tracker is a child too.
        return sum(b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in children)

    try:
        wait_until(lambda: healthy() or server.poll() is not None, timeout=60, message="the API to answer")
        assert healthy(), log.read_text()[-3000:]
        wait_until(lambda: serving_processes() == 2, timeout=30, message="two API processes")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert "Application startup failed" not in log.read_text()


def test_workers_yield_the_cpu_to_the_api_in_the_containers_and_the_local_stack():
    from scripts.stack import DEFAULT_WORKER_NICE, stack_processes

    services = compose()["services"]
    workers = [name for name, service in services.items() if "rundramatiq" in service.get("command", [])]
    assert workers and all(services[name]["cpu_shares"] < 1024 for name in workers)
    assert "cpu_shares" not in services["api"]

    specs = stack_processes(python="python", host="127.0.0.1", port=8000, simulator_port=9100)
    niced = {spec.name for spec in specs if spec.nice}
    assert niced == {spec.name for spec in specs if "rundramatiq" in spec.command}
    assert {spec.nice for spec in specs if spec.nice} == {DEFAULT_WORKER_NICE}
    assert 0 < DEFAULT_WORKER_NICE <= 19


def test_the_worker_niceness_comes_from_the_environment_and_is_checked():
    import pytest

    from scripts.stack import DEFAULT_WORKER_NICE, worker_nice

    assert worker_nice({}) == worker_nice({"CAO_WORKER_NICE": " "}) == DEFAULT_WORKER_NICE
    assert worker_nice({"CAO_WORKER_NICE": "0"}) == 0
    assert worker_nice({"CAO_WORKER_NICE": "19"}) == 19
    for wrong in ("-1", "20", "ten", "2.5"):
        with pytest.raises(ValueError, match="CAO_WORKER_NICE"):
            worker_nice({"CAO_WORKER_NICE": wrong})


def test_the_stack_starts_a_process_at_the_niceness_its_spec_asks(tmp_path):
    import sys

    from scripts.stack import ProcessSpec, Stack

    show = [sys.executable, "-c", "import os; print(os.nice(0), flush=True)"]
    stack = Stack(
        [ProcessSpec("niced", show, nice=7), ProcessSpec("plain", show)], env=dict(os.environ), log_dir=tmp_path
    )
    for name in ("niced", "plain"):
        assert stack.start(name).wait(timeout=30) == 0
    parent = os.nice(0)
    assert int((tmp_path / "plain.log").read_text()) == parent
    assert int((tmp_path / "niced.log").read_text()) == min(parent + 7, 19)
