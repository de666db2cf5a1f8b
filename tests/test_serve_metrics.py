"""``manage.py serve_metrics``: /metrics of a worker host that runs no API, as a real process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from django.db import connection

from scripts.testbed import free_port, wait_until, with_database
from tests.test_observability import sample

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent


def process_env(settings, metrics_dir, **extra):
    """This run's backends (the test database, its Redis) and a shared metrics directory."""
    return {
        **os.environ,
        "DATABASE_URL": with_database(settings.DATABASE_URL, connection.settings_dict["NAME"]),
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "CAO_ENV_FILE": "",
        **extra,
    }


def record_in_another_process(env, code):
    """Run ``code`` in a process of its own, as a worker would record its metrics."""
    script = "import django; django.setup(); from common import metrics; " + code
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env={**env, "DJANGO_SETTINGS_MODULE": "cao_project.settings"},
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr


class MetricsServer:
    def __init__(self, env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve_metrics", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )

    def scrape(self, **kwargs):
        def answered():
            if self.process.poll() is not None:
                raise AssertionError(f"serve_metrics exited: {self.process.stdout.read()}")
            try:
                # In a tuple: a 403 response is falsy, and must end the wait too.
                return (requests.get(self.url, timeout=5, **kwargs),)
            except requests.ConnectionError:
                return None

        return wait_until(answered, timeout=30, message="serve_metrics to answer")[0]

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process.stdout.close()


@pytest.fixture
def metrics_server(settings, tmp_path):
    servers = []

    def start(**extra):
        server = MetricsServer(process_env(settings, tmp_path, **extra))
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def test_it_serves_the_sum_of_every_process_and_the_shared_state(registry, settings, tmp_path, metrics_server):
    from orchestration.per_process import get_limiter

    # Given two worker processes that recorded calls, and a slot of video_gen_v2 held
    env = process_env(settings, tmp_path)
    record_in_another_process(env, "metrics.JOBS_COMPLETED.labels('viral_video').inc(2)")
    record_in_another_process(env, "metrics.JOBS_COMPLETED.labels('viral_video').inc(3)")
    assert get_limiter().acquire("video_gen_v2", "j:1:1", limit=2, ttl_s=60, payload="{}").granted

    # When the host's metrics are scraped
    response = metrics_server().scrape()

    # Then the processes' counters are added up, and the shared state is read at scrape time
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    text = response.text
    assert sample(text, "cao_jobs_completed_total", feature="viral_video") == 5
    assert sample(text, "cao_slots_in_use", service="video_gen_v2") == 1
    assert sample(text, "cao_slot_limit", service="video_gen_v2") == 2
    assert sample(text, "cao_slot_waiters", service="video_gen_v2") == 0
    assert sample(text, "cao_queue_depth", queue="heavy", kind="ready") == 0


def test_with_redis_down_it_still_answers_without_the_shared_state(registry, settings, tmp_path, metrics_server):
    env = process_env(settings, tmp_path)
    record_in_another_process(env, "metrics.JOBS_CREATED.labels('business_plan').inc()")

    response = metrics_server(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0", BROKER_URL="").scrape()

    # The process-recorded figures are there; the series read from Redis are missing, not zero.
    assert response.status_code == 200
    assert sample(response.text, "cao_jobs_created_total", feature="business_plan") == 1
    with pytest.raises(AssertionError, match="no series"):
        sample(response.text, "cao_slots_in_use", service="video_gen_v2")


def test_with_a_metrics_token_set_a_scrape_without_it_is_refused(registry, metrics_server):
    server = metrics_server(CAO_METRICS_TOKEN="scrape-me")

    refused = server.scrape()
    allowed = server.scrape(headers={"Authorization": "Bearer scrape-me"})

    assert refused.status_code == 403 and refused.json()["error"]["code"] == "FORBIDDEN"
    assert allowed.status_code == 200 and "cao_" in allowed.text


def test_without_a_token_only_the_allowed_addresses_may_scrape(registry, metrics_server):
    refused = metrics_server(CAO_METRICS_ALLOWED_IPS="10.9.9.9").scrape()

    assert refused.status_code == 403
