"""Request throttling: exact under concurrency, and out of the way while Redis is down."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from api_keys.models import ApiKey
from api_keys.throttling import parse_rate

pytestmark = pytest.mark.django_db(transaction=True)


def test_concurrent_requests_never_overshoot_the_rate(registry, asgi_server, settings):
    # Given a limit of 20 a minute and 48 requests released at the same instant
    settings.CAO_THROTTLE_RATES = {"client": "20/min", "job_create": "none"}
    _, raw_key = ApiKey.objects.create_key(name="racer")
    start = threading.Barrier(48)

    def call(_):
        with requests.Session() as session:
            start.wait(10)
            return session.get(
                f"{asgi_server.base_url}/api/v1/features", headers={"X-API-Key": raw_key}, timeout=30
            ).status_code

    with ThreadPoolExecutor(48) as pool:
        statuses = list(pool.map(call, range(48)))

    # Then exactly 20 pass and the rest are told to wait
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 28


def test_the_budget_refills_at_the_configured_rate(api, registry, settings, redis_db):
    settings.CAO_THROTTLE_RATES = {"client": "2/s", "job_create": "none"}

    assert [api.get("/api/v1/features").status_code for _ in range(3)] == [200, 200, 429]
    limited = api.get("/api/v1/features")
    wait_s = float(limited["Retry-After"])
    assert 0 < wait_s <= 1


def test_a_post_the_job_creation_budget_refuses_spends_nothing_of_the_clients_budget(api, registry, settings, redis_db):
    # Given 5 requests a minute in all, of which 2 may start jobs
    settings.CAO_THROTTLE_RATES = {"client": "5/min", "job_create": "2/min"}
    body = {"feature_name": "business_plan", "input_data": {}}

    # When a third job is refused
    assert [api.post("/api/v1/jobs", body, format="json").status_code for _ in range(3)] == [201, 201, 429]

    # Then the refused request was not counted: 3 of the 5 remain for everything else
    assert [api.get("/api/v1/features").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_requests_pass_while_redis_is_unreachable(api, registry, settings, caplog):
    # Given a Redis nobody answers on
    settings.CAO_THROTTLE_RATES = {"client": "1/min", "job_create": "1/min"}
    settings.REDIS_URL = "redis://127.0.0.1:1/0"

    # Then throttling steps aside instead of failing the request
    assert [api.get("/api/v1/features").status_code for _ in range(3)] == [200, 200, 200]
    assert "requests are not throttled" in caplog.text


@pytest.mark.parametrize(
    "rate, parsed",
    [("600/min", (600, 60)), ("5/s", (5, 1)), ("10/hour", (10, 3600)), ("1/day", (1, 86400)), ("none", None), ("", None)],
)
def test_rates_use_drf_syntax(rate, parsed):
    assert parse_rate(rate) == parsed


def test_a_malformed_rate_stops_the_process_at_start_up():
    from tests.test_settings import run_python

    result = run_python("import cao_project.settings", SECRET_KEY="x", CAO_THROTTLE_RATE="lots")

    assert result.returncode != 0
    assert "throttle rate must look like 600/min" in result.stderr
