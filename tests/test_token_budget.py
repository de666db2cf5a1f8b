"""A service's tokens_per_minute: estimated at the grant, reconciled from the reply's metrics.

The limiter against a real Redis, then real Dramatiq worker threads calling
the simulator over HTTP (its replies report input_tokens and output_tokens).
"""

import pytest
import redis
from django.conf import settings

from jobs.models import Job, JobEvent, JobStatus
from orchestration.limiter import Limiter
from orchestration.per_process import get_limiter
from orchestration.token_usage import MAX_TOKENS, tokens_reported
from scripts.polling import wait_until
from services_registry.models import Service
from tests.job_api import post_job as submit

SERVICE = "llm"


# --- What a reply says it used ---------------------------------------------------------------


@pytest.mark.parametrize(
    "metrics, tokens",
    [
        ({"tokens_used": 42}, 42),
        ({"total_tokens": 42.0}, 42),
        ({"input_tokens": 30, "output_tokens": 12}, 42),
        ({"prompt_tokens": 30, "completion_tokens": 12}, 42),
        ({"usage": {"total_tokens": 42}}, 42),
        ({"usage": {"prompt_tokens": 40, "completion_tokens": 2}}, 42),
        ({"output_tokens": 7}, 7),  # half a pair is what it says
        ({"tokens_used": 5, "input_tokens": 100}, 5),  # a total comes first
        ({"tokens_used": 10**15}, MAX_TOKENS),
        ({"execution_time_ms": 12}, None),
        ({"tokens_used": True}, None),
        ({"tokens_used": -1}, None),
        ({"tokens_used": float("nan")}, None),
        ({"tokens_used": "42"}, None),
        ({"usage": "lots"}, None),
        ("not a dict", None),
        ({}, None),
    ],
)
def test_tokens_reported_reads_the_documented_names(metrics, tokens):
    assert tokens_reported(metrics) == tokens


# --- The limiter ---------------------------------------------------------------------------------


@pytest.fixture
def limiter():
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    client.flushdb()
    yield Limiter(client, grant_ttl_s=60)
    client.flushdb()
    client.close()


def acquire(limiter, member, *, tpm=3000, estimate=1000, limit=10):
    return limiter.acquire(
        SERVICE, member, limit=limit, ttl_s=60, payload=member, tokens_per_minute=tpm, token_estimate=estimate
    )


def test_calls_are_granted_while_their_estimates_fit_the_budget(limiter):
    assert [acquire(limiter, f"c{i}").granted for i in range(3)] == [True, True, True]

    held = acquire(limiter, "c3")

    assert not held.granted
    assert held.rate_limit == "tokens_per_minute" and held.rate_limited_until is not None
    occupancy = limiter.occupancy(SERVICE)
    assert (occupancy.tokens_per_minute, occupancy.tokens_in_window) == (3000, 3000)


def test_what_a_reply_reports_replaces_its_estimate_and_frees_the_rest(limiter):
    for i in range(3):
        acquire(limiter, f"c{i}")
    acquire(limiter, "waiting")

    # The first call used 100 tokens, not 1000: 2100 counted, the waiting call's 1000 do not fit yet;
    assert limiter.release(SERVICE, "c0", limit=10, tokens_used=100) == ()
    # the second used 100 too: 1200, and they do.
    assert limiter.release(SERVICE, "c1", limit=10, tokens_used=100) == ("waiting",)
    assert limiter.occupancy(SERVICE).tokens_in_window == 100 + 100 + 1000 + 1000


def test_a_reply_that_does_not_say_keeps_its_estimate(limiter):
    for i in range(3):
        acquire(limiter, f"c{i}")
    acquire(limiter, "waiting")

    assert limiter.release(SERVICE, "c0", limit=10) == ()
    assert limiter.occupancy(SERVICE).tokens_in_window == 3000


def test_a_call_larger_than_the_whole_budget_goes_alone(limiter):
    assert acquire(limiter, "big", estimate=5000).granted  # nothing else in the window
    assert not acquire(limiter, "next", estimate=5000).granted


def test_tokens_leave_with_their_window(limiter):
    first = limiter.acquire(
        SERVICE, "c0", limit=10, ttl_s=60, payload="c0", tokens_per_minute=1000, token_estimate=1000,
        rate_window_s=0.2,
    )
    assert first.granted
    parked = limiter.acquire(
        SERVICE, "c1", limit=10, ttl_s=60, payload="c1", tokens_per_minute=1000, token_estimate=1000,
        rate_window_s=0.2,
    )
    assert parked.rate_limit == "tokens_per_minute"

    # Once c0's start is out of the window, so are its tokens: the line moves.
    wait_until(
        lambda: limiter.redispatch_waiters(SERVICE, limit=10) == ("c1",), timeout=5, interval=0.05,
        message="c0's tokens to leave the window",
    )


# --- Real workers -------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_budget_holds_calls_back_until_replies_say_what_they_used(api, registry, simulator, worker, wait):
    # Two calls' estimates do not fit: one call at a time, whatever the concurrency limit.
    Service.objects.filter(name="prompt_enhancer").update(
        concurrency_limit=10, tokens_per_minute=1500, tokens_per_call=1000
    )
    simulator.configure(latency={"prompt_enhancer": "200ms"})

    jobs = [submit(api) for _ in range(3)]

    wait(
        lambda: Job.objects.filter(pk__in=jobs, status=JobStatus.COMPLETED).count() == len(jobs),
        timeout=30, message="every job to complete",
    )
    stats = simulator.stats()["prompt_enhancer"]
    assert stats["max_in_flight"] == 1
    assert stats["calls"] == len(jobs)  # waiting spent no attempt
    held = [event.payload for event in JobEvent.objects.filter(job_id__in=jobs, type="WAITING_FOR_SLOT")]
    assert held and all(payload["limit"] == "tokens_per_minute" for payload in held)
    # Each reply's own count replaced its estimate.
    reported = [
        tokens_reported(Job.objects.get(pk=job_id).context["step_0_prompt_enhancer"]["metrics"]) for job_id in jobs
    ]
    assert all(tokens < 1000 for tokens in reported)
    assert get_limiter().occupancy("prompt_enhancer").tokens_in_window == sum(reported)


# --- What ops see ------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_metrics_and_the_admin_show_both_rate_budgets_and_their_use(client, registry):
    from ops.admin.services import describe_occupancy
    from tests.test_observability import sample, scrape

    Service.objects.filter(name="prompt_enhancer").update(
        requests_per_minute=20, tokens_per_minute=5000, tokens_per_call=700
    )
    limiter = get_limiter()
    for member in ("a:0:1", "b:0:1"):
        assert limiter.acquire(
            "prompt_enhancer", member, limit=5, ttl_s=60, payload=member, requests_per_minute=20,
            tokens_per_minute=5000, token_estimate=700,
        ).granted
    limiter.release("prompt_enhancer", "a:0:1", limit=5, tokens_used=120)

    text = scrape(client)

    assert sample(text, "cao_service_requests_per_minute", service="prompt_enhancer") == 20
    assert sample(text, "cao_service_calls_in_rate_window", service="prompt_enhancer") == 2
    assert sample(text, "cao_service_tokens_per_minute", service="prompt_enhancer") == 5000
    assert sample(text, "cao_service_tokens_in_rate_window", service="prompt_enhancer") == 120 + 700
    shown = describe_occupancy(limiter.occupancy("prompt_enhancer"), limit=5)
    assert "2 / 20 calls this minute" in shown and "820 / 5000 tokens this minute" in shown
