"""A 429 or 503 with Retry-After cools the whole service down, for every job, without spending their attempts.

Real PostgreSQL, Redis, Dramatiq worker threads, and the simulator over HTTP
answering 429 with a Retry-After header.
"""

import pytest

from jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, StepAttempt, StepState
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.job_api import post_job as submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVICE = "prompt_enhancer"  # business_plan's first step
COOL_DOWN_S = 3


def attempts(job_id):
    return list(StepAttempt.objects.filter(job_id=job_id, service=SERVICE).order_by("started_at"))


def test_a_429_with_retry_after_holds_every_job_of_the_service_back_until_then(api, registry, simulator, worker, wait):
    Service.objects.filter(name=SERVICE).update(concurrency_limit=4)
    simulator.configure(fail={SERVICE: "429"}, retry_after={SERVICE: f"{COOL_DOWN_S}s"})
    limiter = get_limiter()

    # Given a first job whose call was answered 429 with Retry-After: 3
    first = submit(api)
    wait(lambda: limiter.cooling_left_s(SERVICE) > 0, timeout=20, message="the service to cool down")
    simulator.configure(fail={SERVICE: None})  # from now on the service would answer

    # When more jobs come while it cools down, with slots free
    later = [submit(api), submit(api)]

    # Then they wait in its line, saying why, and call it only once the cool-down is over
    wait(
        lambda: Job.objects.filter(pk__in=later, step_state=StepState.WAITING).count() == 2,
        timeout=10, message="the later jobs to wait",
    )
    for job_id in later:
        waiting = JobEvent.objects.get(job_id=job_id, type="WAITING_FOR_SLOT").payload
        assert waiting["limit"] == "cool_down" and waiting["cooling_until"]
    wait(
        lambda: Job.objects.filter(pk__in=[first, *later], status=JobStatus.COMPLETED).count() == 3,
        timeout=30, message="every job to complete",
    )
    calls = simulator.requests(SERVICE, kind="execute")
    refused, *answered = sorted(calls, key=lambda call: call["received_at"])
    assert refused["status"] == 429
    assert len(answered) == 3
    assert min(call["received_at"] for call in answered) - refused["received_at"] >= COOL_DOWN_S - 0.05

    # Waiting spent no attempt: one call each for the later jobs, the refused one and its retry for the first
    for job_id in later:
        assert [attempt.outcome for attempt in attempts(job_id)] == [AttemptOutcome.SUCCEEDED]
    assert [attempt.error_code for attempt in attempts(first)] == ["RESOURCE_EXHAUSTED", ""]


def test_a_429_without_retry_after_cools_nothing_down(api, registry, simulator, worker, wait, fast_retries):
    simulator.configure(fail={SERVICE: "429x1"})

    job_id = submit(api)

    wait(lambda: Job.objects.get(pk=job_id).status == JobStatus.COMPLETED, timeout=30, message="the job to complete")
    assert get_limiter().cooling_left_s(SERVICE) == 0
    assert not JobEvent.objects.filter(job_id=job_id, type="WAITING_FOR_SLOT").exists()


def test_the_line_moves_when_the_cool_down_ends_though_no_retry_comes(api, registry, simulator, worker, wait):
    # The refused job has no attempt left: nothing but the cool-down's end can move the line
    Service.objects.filter(name=SERVICE).update(concurrency_limit=4, max_attempts=1)
    simulator.configure(fail={SERVICE: "429"}, retry_after={SERVICE: "1s"})
    refused = submit(api)
    wait(lambda: get_limiter().cooling_left_s(SERVICE) > 0, timeout=20, message="the service to cool down")
    simulator.configure(fail={SERVICE: None})

    later = submit(api)

    wait(lambda: Job.objects.get(pk=later).status == JobStatus.COMPLETED, timeout=20, message="the later job to complete")
    assert Job.objects.get(pk=refused).status == JobStatus.FAILED


def test_a_cool_down_shows_in_the_metrics_and_on_the_admin_list(client, registry):
    from ops.admin.services import describe_occupancy
    from tests.test_observability import sample, scrape

    limiter = get_limiter()
    assert sample(scrape(client), "cao_service_cool_down_seconds", service=SERVICE) == 0

    limiter.cool_down(SERVICE, seconds=30)

    assert 20 < sample(scrape(client), "cao_service_cool_down_seconds", service=SERVICE) <= 30
    assert "cooling down" in describe_occupancy(limiter.occupancy(SERVICE), limit=4)
    assert "cooling down" not in describe_occupancy(limiter.occupancy("fast_chat_llm"), limit=4)
