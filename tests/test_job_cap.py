"""A key's cap on concurrent jobs: held jobs, admission as running ones end, and the count under its lock.

Real PostgreSQL and Redis; the tests that run jobs use a real Dramatiq
worker and the simulator over HTTP.
"""

import threading
from datetime import timedelta

import dramatiq
import pytest
from django.conf import settings
from django.db import connection
from django.utils import timezone

from api_keys.models import ApiKey
from jobs.models import Job, JobEvent, JobStatus, StepState
from jobs.outcomes import Failure
from jobs.state import lock_job
from jobs.steps import step_claim, step_fail, step_succeed
from orchestration.commands import cancel_job, resume_job, submit_job
from orchestration.maintenance import run_maintenance
from tests.conftest import keyed_api_client

pytestmark = pytest.mark.django_db(transaction=True)

FEATURE = "business_plan"  # prompt_enhancer, fast_chat_llm, summarizer_pro, email_notifier


def capped_key(cap, name="capped"):
    api_key, raw_key = ApiKey.objects.create_key(name=name)
    ApiKey.objects.filter(pk=api_key.pk).update(max_concurrent_jobs=cap)  # the tests' CAO_REGISTRY_CACHE_S is 0
    api_key.raw_key = raw_key
    return api_key


def submit(owner, n=0, **fields):
    return submit_job(feature_name=FEATURE, input_data={"n": n}, owner=owner, **fields)[0]


def state_of(job):
    return Job.objects.values_list("status", "step_state").get(pk=job.pk)


def queued_messages(job):
    """The step messages of ``job`` waiting in the broker's queues."""
    broker = dramatiq.get_broker()
    found = []
    for queue in settings.CAO_QUEUES:
        for body in broker.client.hvals(f"{broker.namespace}:{queue}.msgs"):
            message = dramatiq.Message.decode(body)
            if message.args and message.args[0] == str(job.pk):
                found.append(message)
    return found


def events_of(job):
    return list(JobEvent.objects.filter(job=job).order_by("seq").values_list("type", "payload"))


# --- Held at the cap -----------------------------------------------------------------------------


def test_a_job_beyond_its_keys_cap_is_accepted_held_sends_nothing_and_says_why(registry):
    key = capped_key(2)
    api = keyed_api_client(key)

    responses = [api.post("/api/v1/jobs", {"feature_name": FEATURE, "input_data": {"n": n}}, format="json")
                 for n in range(4)]

    assert [response.status_code for response in responses] == [201] * 4
    jobs = [Job.objects.get(pk=response.json()["job_id"]) for response in responses]
    assert [job.step_state for job in jobs] == [StepState.QUEUED, StepState.QUEUED, StepState.HELD, StepState.HELD]
    assert [len(queued_messages(job)) for job in jobs] == [1, 1, 0, 0]
    for position, job in enumerate(jobs[2:], start=1):
        ((kind, payload),) = events_of(job)
        assert kind == "WAITING_FOR_SLOT"
        assert (payload["limit"], payload["position"], payload["seq"]) == ("key_jobs", position, 1)
        assert "at most 2 jobs at once" in payload["message"]
    assert api.get(f"/api/v1/jobs/{jobs[2].pk}").json()["status"] == "PENDING"


def test_a_key_without_a_cap_never_holds_a_job(registry, client_key):
    jobs = [submit(client_key, n) for n in range(5)]

    assert {state_of(job) for job in jobs} == {(JobStatus.PENDING, StepState.QUEUED)}


def test_an_idempotent_retry_of_a_held_job_returns_it_and_holds_nothing_more(registry):
    key = capped_key(1)
    submit(key)
    held, created = submit_job(feature_name=FEATURE, input_data={}, owner=key, idempotency_key="k1")
    again, created_again = submit_job(feature_name=FEATURE, input_data={}, owner=key, idempotency_key="k1")

    assert (created, created_again, again.pk) == (True, False, held.pk)
    assert Job.objects.filter(owner=key).count() == 2
    assert [kind for kind, _ in events_of(held)] == ["WAITING_FOR_SLOT"]


def test_concurrent_submissions_never_admit_more_than_the_cap(registry):
    key = capped_key(1)
    start = threading.Barrier(8)
    errors = []

    def client():
        try:
            start.wait(timeout=10)
            submit(key)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert not errors
    states = list(Job.objects.filter(owner=key).values_list("step_state", flat=True))
    assert sorted(states) == sorted([StepState.QUEUED] + [StepState.HELD] * 7)


# --- Admitted as running jobs end ---------------------------------------------------------------


def test_cancelling_a_running_job_admits_the_next_at_once_with_a_fresh_token(registry):
    key = capped_key(1)
    running, held = submit(key, 0), submit(key, 1)
    assert state_of(held) == (JobStatus.PENDING, StepState.HELD)

    cancel_job(job_id=str(running.pk), owner=key)

    admitted = Job.objects.get(pk=held.pk)
    assert admitted.step_state == StepState.QUEUED
    assert admitted.step_token == held.step_token + 1
    (message,) = queued_messages(held)
    assert message.args[:3] == (str(held.pk), 0, admitted.step_token)


def test_cancelling_a_held_job_frees_no_place(registry):
    key = capped_key(1)
    running, first, second = submit(key, 0), submit(key, 1), submit(key, 2)

    cancel_job(job_id=str(first.pk), owner=key)

    assert state_of(first) == (JobStatus.CANCELLED, StepState.IDLE)
    assert state_of(running) == (JobStatus.PENDING, StepState.QUEUED)
    assert state_of(second) == (JobStatus.PENDING, StepState.HELD)
    assert queued_messages(second) == []


def test_held_jobs_go_in_by_priority_aged_by_their_wait(registry, settings):
    settings.CAO_PRIORITY_AGING_S = 10
    key = capped_key(1)
    running = submit(key)
    patient = submit(key, 1, priority=0)
    urgent = submit(key, 2, priority=5)
    later = submit(key, 3, priority=1)
    # The priority-0 job has been held 100 s: 0 + 100/10 outranks 5.
    Job.objects.filter(pk=patient.pk).update(step_due_at=timezone.now() - timedelta(seconds=100))

    order = []
    for current in (running, patient, urgent):
        cancel_job(job_id=str(current.pk), owner=key)
        order.append(Job.objects.get(owner=key, status=JobStatus.PENDING, step_state=StepState.QUEUED).pk)

    assert order == [patient.pk, urgent.pk, later.pk]


def test_a_recorded_end_says_the_job_ended_and_a_next_step_does_not(registry, client_key):
    job = submit(client_key)

    with_lock = lock_and(job)
    step_claim(job=with_lock, max_attempts=3)
    advanced = step_succeed(job=with_lock, token=with_lock.step_token, data={}, metrics={})
    step_claim(job=with_lock, max_attempts=3)
    retried = step_fail(
        job=with_lock, token=with_lock.step_token, failure=Failure("X", "x", True), retry_delay_s=1.0
    )
    step_claim(job=with_lock, max_attempts=3)
    failed = step_fail(job=with_lock, token=with_lock.step_token, failure=Failure("X", "x", False), retry_delay_s=None)

    assert (advanced.ended, retried.ended, failed.ended) == (False, False, True)
    with_lock.status, with_lock.current_step_index = JobStatus.RUNNING, with_lock.total_steps - 1
    with_lock.step_state, with_lock.step_token = StepState.QUEUED, with_lock.step_token + 1
    step_claim(job=with_lock, max_attempts=3)
    assert step_succeed(job=with_lock, token=with_lock.step_token, data={}, metrics={}).ended


def lock_and(job):
    from django.db import transaction

    with transaction.atomic():
        return lock_job(job.pk)


def attempt_windows(jobs):
    """Each job's [first call started, finished] from its rows."""
    windows = []
    for job in Job.objects.filter(pk__in=[job.pk for job in jobs]).prefetch_related("attempts"):
        first = min(attempt.started_at for attempt in job.attempts.all())
        windows.append((first, job.finished_at))
    return windows


def most_at_once(windows):
    edges = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows], key=lambda e: (e[0], e[1]))
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def test_held_jobs_start_as_running_ones_end_and_never_more_than_the_cap_run(registry, simulator, worker, wait):
    simulator.configure(latency={"prompt_enhancer": "150ms"})
    capped, free = capped_key(2), capped_key(0, name="free")
    capped_jobs = [submit(capped, n) for n in range(6)]
    free_jobs = [submit(free, n) for n in range(3)]

    wait(
        lambda: Job.objects.filter(pk__in=[job.pk for job in capped_jobs + free_jobs], status=JobStatus.COMPLETED)
        .count() == 9,
        timeout=60, message="every job to complete",
    )

    # The capped key's jobs ran two at a time, no more (each one's calls lie
    # within the time it held a place); the other key's, all at once.
    assert most_at_once(attempt_windows(capped_jobs)) == 2
    assert most_at_once(attempt_windows(free_jobs)) == 3
    held = [job for job in capped_jobs if events_of(job)[0][1].get("limit") == "key_jobs"]
    assert len(held) == 4


def test_a_failed_job_frees_its_place_for_a_held_one(registry, simulator, worker, wait):
    simulator.configure(fail={"prompt_enhancer": "400x1"})
    key = capped_key(1)
    failing, held = submit(key, 0), submit(key, 1)

    # (Each job's first call fails, and the failure is not retryable.)
    wait(lambda: state_of(held)[0] == JobStatus.FAILED, timeout=60, message="the held job to run and fail")

    assert state_of(failing)[0] == JobStatus.FAILED
    assert [kind for kind, _ in events_of(held)][:2] == ["WAITING_FOR_SLOT", "STEP_STARTED"]


# --- Resume, maintenance, deadlines --------------------------------------------------------------


def fail_directly(job):
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.FAILED, step_state=StepState.IDLE, retryable=True, error_code="X", finished_at=timezone.now()
    )


def test_resuming_a_failed_job_while_the_key_is_at_its_cap_holds_it(registry):
    key = capped_key(1)
    failed = submit(key, 0)
    fail_directly(failed)
    running = submit(key, 1)

    outcome = resume_job(job_id=str(failed.pk), owner=key)

    assert outcome.dispatch is None
    assert state_of(failed) == (JobStatus.RUNNING, StepState.HELD)
    assert [kind for kind, _ in events_of(failed)][-2:] == ["JOB_RESUMED", "WAITING_FOR_SLOT"]
    token = Job.objects.get(pk=failed.pk).step_token
    assert [m for m in queued_messages(failed) if m.args[2] == token] == []  # only its first, stale message
    cancel_job(job_id=str(running.pk), owner=key)
    assert state_of(failed) == (JobStatus.RUNNING, StepState.QUEUED)


def test_resuming_with_room_sends_the_step_as_before(registry):
    key = capped_key(2)
    failed = submit(key)
    fail_directly(failed)

    outcome = resume_job(job_id=str(failed.pk), owner=key)

    assert outcome.dispatch is not None
    assert state_of(failed) == (JobStatus.RUNNING, StepState.QUEUED)


def test_maintenance_admits_held_jobs_once_the_cap_is_raised(registry):
    key = capped_key(1)
    jobs = [submit(key, n) for n in range(4)]
    ApiKey.objects.filter(pk=key.pk).update(max_concurrent_jobs=3)

    report = run_maintenance()

    assert report.admitted == 2
    assert [state_of(job)[1] for job in jobs] == [StepState.QUEUED] * 3 + [StepState.HELD]
    assert run_maintenance().admitted == 0


def test_maintenance_admits_when_a_job_ended_without_admitting(registry):
    # A worker that died between recording a job's end and admitting the next.
    key = capped_key(1)
    ended, held = submit(key, 0), submit(key, 1)
    Job.objects.filter(pk=ended.pk).update(status=JobStatus.COMPLETED, step_state=StepState.IDLE)

    assert run_maintenance().admitted == 1
    assert state_of(held) == (JobStatus.PENDING, StepState.QUEUED)
    assert len(queued_messages(held)) == 1


def test_a_held_job_is_not_stuck_but_fails_at_its_deadline(registry, settings):
    key = capped_key(1)
    submit(key, 0)
    held = submit(key, 1)
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_STUCK_SECONDS + 60)
    Job.objects.filter(pk=held.pk).update(last_progress_at=long_ago)
    Job.objects.exclude(pk=held.pk).update(last_progress_at=timezone.now())

    run_maintenance()
    assert state_of(held) == (JobStatus.PENDING, StepState.HELD)

    Job.objects.filter(pk=held.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    report = run_maintenance()

    assert report.deadline_failed == 1
    job = Job.objects.get(pk=held.pk)
    assert (job.status, job.step_state, job.error_code) == (JobStatus.FAILED, StepState.IDLE, "DEADLINE_EXCEEDED")


def test_an_admitted_job_starts_the_stuck_clock_again(registry, settings):
    key = capped_key(1)
    running, held = submit(key, 0), submit(key, 1)
    long_ago = timezone.now() - timedelta(seconds=settings.JOB_STUCK_SECONDS + 60)
    Job.objects.filter(pk=held.pk).update(last_progress_at=long_ago)

    cancel_job(job_id=str(running.pk), owner=key)
    run_maintenance()

    assert state_of(held) == (JobStatus.PENDING, StepState.QUEUED)
