"""A service's requests_per_minute: no window holds more call starts, across every job, and none is lost.

Real PostgreSQL, Redis, Dramatiq worker threads and the simulator over HTTP;
the window is shortened to a second (CAO_RATE_WINDOW_S) so the test takes
seconds, not minutes.
"""

import pytest

from jobs.models import Job, JobEvent, JobStatus
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.job_api import post_job as submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

SERVICE = "prompt_enhancer"  # business_plan's first step
WINDOW_S = 1.0
BUDGET = 2


def test_calls_start_within_the_budget_of_every_window_and_every_job_finishes(api, registry, simulator, worker, wait, settings):
    settings.CAO_RATE_WINDOW_S = WINDOW_S
    Service.objects.filter(name=SERVICE).update(requests_per_minute=BUDGET, concurrency_limit=10)

    jobs = [submit(api) for _ in range(5)]

    wait(
        lambda: Job.objects.filter(pk__in=jobs, status=JobStatus.COMPLETED).count() == len(jobs),
        timeout=30, message="every job to complete",
    )
    starts = sorted(call["received_at"] for call in simulator.requests(SERVICE, kind="execute"))
    assert len(starts) == len(jobs)  # one call each: waiting spent no attempt
    # The simulator sees a call a little after its slot was granted: 0.15 s of slack.
    for first in starts:
        assert sum(first <= other < first + WINDOW_S - 0.15 for other in starts) <= BUDGET
    held = [
        event.payload for event in JobEvent.objects.filter(job_id__in=jobs, type="WAITING_FOR_SLOT")
    ]
    assert held and all(payload["limit"] == "requests_per_minute" for payload in held)
    occupancy = get_limiter().occupancy(SERVICE)
    assert occupancy.requests_per_minute == BUDGET
