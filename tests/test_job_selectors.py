"""jobs.selectors.calls_in_flight: what the limiter's census counts as calls still running."""

import pytest

from jobs.models import Job, JobStatus, StepState
from jobs.selectors import calls_in_flight
from orchestration.messages import lease_member
from orchestration.per_process import get_limiter

pytestmark = pytest.mark.django_db

PLAN = ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"]


def job(status, step_state, *, index=1, token=3, steps=PLAN):
    return Job.objects.create(
        feature_name="business_plan", steps=steps, status=status, step_state=step_state,
        current_step_index=index, step_token=token,
    )


@pytest.mark.parametrize(
    "status, step_state, index, counted",
    [
        (JobStatus.RUNNING, StepState.RUNNING, 1, True),  # a call in flight
        (JobStatus.CANCELLED, StepState.RUNNING, 1, True),  # cancelled mid-call: the call still runs
        (JobStatus.RUNNING, StepState.WAITING, 1, False),  # parked: holds no slot
        (JobStatus.RUNNING, StepState.QUEUED, 1, False),  # message sent, not started
        (JobStatus.RUNNING, StepState.IDLE, 1, False),
        (JobStatus.CANCELLED, StepState.IDLE, 1, False),  # cancelled, its call recorded
        (JobStatus.CANCELLED, StepState.WAITING, 1, False),
        (JobStatus.PENDING, StepState.QUEUED, 1, False),
        (JobStatus.FAILED, StepState.IDLE, 1, False),
        (JobStatus.COMPLETED, StepState.IDLE, 1, False),
        (JobStatus.FAILED, StepState.RUNNING, 1, False),  # a failed job's token was fenced: not a call
        (JobStatus.COMPLETED, StepState.RUNNING, 1, False),
        (JobStatus.RUNNING, StepState.RUNNING, 2, False),  # running, but on another service
        (JobStatus.RUNNING, StepState.RUNNING, 4, False),  # past the last step: on no service
    ],
)
def test_which_steps_count_as_calls_in_flight(status, step_state, index, counted):
    subject = job(status, step_state, index=index)

    found = calls_in_flight("fast_chat_llm")

    assert found == ([(subject.id, index, 3)] if counted else [])


def test_every_call_of_the_service_is_listed_with_its_step_and_token():
    running = job(JobStatus.RUNNING, StepState.RUNNING, token=7)
    cancelled = job(JobStatus.CANCELLED, StepState.RUNNING, token=2)
    elsewhere = job(JobStatus.RUNNING, StepState.RUNNING, index=0, token=5)
    job(JobStatus.RUNNING, StepState.WAITING)

    assert sorted(calls_in_flight("fast_chat_llm")) == sorted([(running.id, 1, 7), (cancelled.id, 1, 2)])
    assert calls_in_flight("prompt_enhancer") == [(elsewhere.id, 0, 5)]
    assert calls_in_flight("video_gen_v2") == []


def test_a_service_twice_in_a_recipe_counts_only_the_current_step():
    twice = ["fast_chat_llm", "summarizer_pro", "fast_chat_llm"]
    at_first = job(JobStatus.RUNNING, StepState.RUNNING, index=0, steps=twice)
    at_second = job(JobStatus.RUNNING, StepState.RUNNING, index=1, steps=twice)

    assert calls_in_flight("fast_chat_llm") == [(at_first.id, 0, 3)]
    assert calls_in_flight("summarizer_pro") == [(at_second.id, 1, 3)]


def test_after_redis_lost_its_state_a_cancelled_jobs_call_still_holds_its_slot(redis_db):
    # Given a cancelled job whose call to fast_chat_llm is still in flight, and a limiter with no state
    cancelled = job(JobStatus.CANCELLED, StepState.RUNNING, token=4)
    redis_db.flushdb()
    limiter = get_limiter()

    # When another step asks for the only slot, with the census the engine passes
    acquisition = limiter.acquire(
        "fast_chat_llm", "newcomer:1:1", limit=1, ttl_s=30, payload="{}",
        census=lambda: [lease_member(*call) for call in calls_in_flight("fast_chat_llm")],
    )

    # Then the cancelled job's call was counted and the newcomer waits
    assert not acquisition.granted
    assert limiter.locate("fast_chat_llm", lease_member(cancelled.id, 1, 4)) == "holder"


def test_an_index_past_the_last_step_is_on_no_service():
    # A job whose last step is the service, with its index already past it.
    job(JobStatus.RUNNING, StepState.RUNNING, index=2, steps=["prompt_enhancer", "fast_chat_llm"])

    assert calls_in_flight("fast_chat_llm") == []
