"""A service's circuit breaker: consecutive failures open it, every job then waits, one probe call closes it.

Real PostgreSQL, Redis, Dramatiq worker threads and the simulator over HTTP.
"""

import pytest

from jobs.models import Job, JobEvent, JobStatus, StepState
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.job_api import post_job as submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVICE = "prompt_enhancer"  # business_plan's first step
OPEN_S = 1.5


def wait_status(wait, job_ids, status, timeout=30):
    wait(
        lambda: Job.objects.filter(pk__in=job_ids, status=status).count() == len(job_ids),
        timeout=timeout, message=f"{len(job_ids)} job(s) to be {status}",
    )


@pytest.fixture
def breaker(registry):
    # Two failures in a row open it; each job gets one attempt, so each failure is a job's
    Service.objects.filter(name=SERVICE).update(
        breaker_threshold=2, breaker_open_s=OPEN_S, max_attempts=1, concurrency_limit=4
    )


def test_failures_open_the_circuit_jobs_wait_and_a_probe_closes_it(api, breaker, simulator, worker, wait):
    limiter = get_limiter()
    simulator.configure(fail={SERVICE: "500"})

    # Given two calls in a row that failed
    failed = [submit(api)]
    wait_status(wait, failed, JobStatus.FAILED)
    assert limiter.occupancy(SERVICE).circuit == "closed"  # one failure is not enough
    failed.append(submit(api))
    wait_status(wait, failed, JobStatus.FAILED)
    assert limiter.occupancy(SERVICE).circuit == "open"
    simulator.configure(fail={SERVICE: None})  # the service has recovered

    # When jobs come while the circuit is open, with every slot free
    waiting = [submit(api), submit(api)]

    # Then they wait, saying why, and the first call after open_s is one probe; its success lets the rest go
    wait(
        lambda: Job.objects.filter(pk__in=waiting, step_state=StepState.WAITING).count() == 2,
        timeout=10, message="the jobs to wait for the circuit",
    )
    for job_id in waiting:
        assert JobEvent.objects.get(job_id=job_id, type="WAITING_FOR_SLOT").payload["limit"] == "circuit_open"
    wait_status(wait, waiting, JobStatus.COMPLETED)
    assert limiter.occupancy(SERVICE).circuit == "closed"
    calls = sorted(simulator.requests(SERVICE, kind="execute"), key=lambda call: call["received_at"])
    assert [call["status"] for call in calls[:2]] == [500, 500]
    probe, after = calls[2], calls[3]
    assert probe["received_at"] - calls[1]["received_at"] >= OPEN_S - 0.05
    assert probe["status"] == after["status"] == 200

    # And a job after it runs at once
    later = submit(api)
    wait_status(wait, [later], JobStatus.COMPLETED)
    assert not JobEvent.objects.filter(job_id=later, type="WAITING_FOR_SLOT").exists()


def test_refusals_of_the_request_do_not_open_the_circuit(api, breaker, simulator, worker, wait):
    simulator.configure(fail={SERVICE: "400"})  # the request's fault, not the service's

    jobs = [submit(api) for _ in range(3)]

    wait_status(wait, jobs, JobStatus.FAILED)
    assert get_limiter().occupancy(SERVICE).circuit == "closed"


def test_without_a_threshold_the_breaker_is_off_and_sends_nothing(api, registry, simulator, worker, wait, redis_db):
    Service.objects.filter(name=SERVICE).update(max_attempts=1)
    simulator.configure(fail={SERVICE: "500"})

    jobs = [submit(api) for _ in range(3)]

    wait_status(wait, jobs, JobStatus.FAILED)
    assert not redis_db.exists(get_limiter().keys(SERVICE)[9])
