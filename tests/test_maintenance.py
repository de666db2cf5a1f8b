"""Maintenance: stuck jobs, lost messages, lost places in line, dead workers, expired leases."""

import time
from datetime import timedelta

import dramatiq
import pytest
from django.utils import timezone

from jobs.models import Job, JobEvent, JobStatus, StepAttempt, StepState
from orchestration.dispatch import DISPATCH_MARKER, submit_job
from orchestration.leases import get_limiter, lease_member
from orchestration.maintenance import SUSPECT_KEY, run_maintenance

pytestmark = pytest.mark.django_db(transaction=True)


def queued_messages(queue):
    broker = dramatiq.get_broker()
    return broker.client.llen(f"{broker.namespace}:{queue}")


def new_job(registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    return Job.objects.get(pk=job.pk)


def age(job_id, seconds, *, times=(), **fields):
    """Set ``fields`` and move the timestamps named in ``times`` ``seconds`` into the past."""
    past = timezone.now() - timedelta(seconds=seconds)
    Job.objects.filter(pk=job_id).update(**{name: past for name in times}, **fields)


def test_a_running_job_without_progress_is_failed_stuck_and_resumable(registry, settings):
    settings.JOB_STUCK_SECONDS = 60
    job = new_job(registry)
    age(job.pk, 120, status=JobStatus.RUNNING, step_state=StepState.QUEUED, times=["last_progress_at"])

    report = run_maintenance()

    job.refresh_from_db()
    assert report.stuck_failed == 1
    assert (job.status, job.error_code, job.retryable) == ("FAILED", "STUCK_DETECTED", True)
    error = JobEvent.objects.get(job=job, type="JOB_ERROR").payload
    assert error["action"] == "RETRY_AVAILABLE"


def test_a_job_with_recent_progress_is_left_alone(registry, settings):
    settings.JOB_STUCK_SECONDS = 60
    job = new_job(registry)
    age(job.pk, 10, status=JobStatus.RUNNING, times=["last_progress_at"])

    assert run_maintenance().stuck_failed == 0
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING


def test_a_step_whose_message_was_lost_is_sent_again_with_a_new_token(registry, settings, redis_db):
    # Given a queued step whose message and marker vanished (Redis restarted empty)
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = new_job(registry)
    redis_db.flushdb()
    age(job.pk, 30, times=["step_due_at"])

    # When maintenance runs
    report = run_maintenance()

    # Then the step is re-sent under a fresh token, which makes the old message stale
    job.refresh_from_db()
    assert report.redispatched == 1
    assert (job.step_state, job.step_token) == (StepState.QUEUED, 2)
    assert queued_messages("default") == 1
    assert redis_db.get(DISPATCH_MARKER.format(job_id=job.pk)) == "2"


def test_a_step_whose_message_is_still_in_the_broker_is_not_sent_twice(registry, settings):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = new_job(registry)
    age(job.pk, 30, times=["step_due_at"])

    report = run_maintenance()

    assert report.redispatched == 0
    assert Job.objects.get(pk=job.pk).step_token == 1
    assert queued_messages("default") == 1


def test_a_parked_step_that_lost_its_place_in_line_is_sent_again(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = new_job(registry)
    age(job.pk, 30, step_state=StepState.WAITING, times=["updated_at"])

    report = run_maintenance()

    job.refresh_from_db()
    assert report.redispatched == 1
    assert (job.step_state, job.step_token) == (StepState.QUEUED, 2)


def test_a_parked_step_still_in_line_is_left_alone(registry, settings):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = new_job(registry)
    limiter = get_limiter()
    member = lease_member(job.pk, 0, 1)
    for other in range(50):
        limiter.acquire("prompt_enhancer", f"other-{other}", limit=50, ttl_s=60, payload="x")
    assert not limiter.acquire("prompt_enhancer", member, limit=50, ttl_s=15, payload="p").granted
    age(job.pk, 30, step_state=StepState.WAITING, times=["updated_at"])

    assert run_maintenance().redispatched == 0
    assert Job.objects.get(pk=job.pk).step_token == 1


def running_job(registry, seconds_ago):
    job = new_job(registry)
    started = timezone.now() - timedelta(seconds=seconds_ago)
    Job.objects.filter(pk=job.pk).update(
        status=JobStatus.RUNNING, step_state=StepState.RUNNING, step_attempt=1, step_started_at=started
    )
    StepAttempt.objects.create(
        job_id=job.pk, step_index=0, service="prompt_enhancer", attempt=1, token=1, started_at=started
    )
    return job


def test_a_dead_workers_attempt_is_recovered_after_a_second_sighting(registry, settings, redis_db):
    # Given a RUNNING step whose lease is gone (its worker died)
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = running_job(registry, seconds_ago=60)

    # When maintenance first notices, it only remembers the sighting
    first = run_maintenance()
    assert first.lost_attempts == 0
    member = lease_member(job.pk, 0, 1)
    assert redis_db.get(SUSPECT_KEY.format(member=member))

    # ... and when the lease is still missing after a renewal period (ttl/3 + 1 s)
    redis_db.set(SUSPECT_KEY.format(member=member), 0)
    second = run_maintenance()

    # Then the attempt is recorded as LOST and the step retried under a new token
    job.refresh_from_db()
    assert second.lost_attempts == 1
    assert (job.step_state, job.step_token, job.status) == (StepState.QUEUED, 2, JobStatus.RUNNING)
    attempt = StepAttempt.objects.get(job=job, token=1)
    assert (attempt.outcome, attempt.error_code) == ("LOST", "WORKER_LOST")
    assert JobEvent.objects.filter(job=job, type="STEP_RETRYING").exists()


def test_a_running_step_with_a_live_lease_is_left_alone(registry, settings):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = running_job(registry, seconds_ago=60)
    get_limiter().acquire("prompt_enhancer", lease_member(job.pk, 0, 1), limit=50, ttl_s=15, payload="p")

    run_maintenance()
    report = run_maintenance()

    assert report.lost_attempts == 0
    assert Job.objects.get(pk=job.pk).step_state == StepState.RUNNING


def test_a_lost_attempt_without_attempts_left_fails_the_job_retryable(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = running_job(registry, seconds_ago=60)
    Job.objects.filter(pk=job.pk).update(step_attempt=6)
    member = lease_member(job.pk, 0, 1)
    redis_db.set(SUSPECT_KEY.format(member=member), 0)

    run_maintenance()

    job.refresh_from_db()
    assert (job.status, job.error_code, job.retryable) == ("FAILED", "WORKER_LOST", True)


def test_expired_leases_are_reaped_and_their_slots_handed_to_waiters(registry, redis_db):
    limiter = get_limiter()
    assert limiter.acquire("video_gen_v2", "a", limit=2, ttl_s=0.05, payload="pa").granted
    assert limiter.acquire("video_gen_v2", "b", limit=2, ttl_s=0.05, payload="pb").granted
    job = new_job(registry)
    parked = f'["{job.pk}", 1, 7, "video_gen_v2"]'
    assert not limiter.acquire("video_gen_v2", "c", limit=2, ttl_s=600, payload=parked).granted
    time.sleep(0.1)

    report = run_maintenance()

    assert report.reaped_leases == 2
    assert report.handed_off == 1
    assert limiter.locate("video_gen_v2", "c") == "granted"
    assert queued_messages("heavy") == 1


def test_two_maintenance_runs_do_not_double_send(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_SECONDS = 5
    job = new_job(registry)
    redis_db.flushdb()
    age(job.pk, 30, times=["step_due_at"])

    first, second = run_maintenance(), run_maintenance()

    assert (first.redispatched, second.redispatched) == (1, 0)
    assert Job.objects.get(pk=job.pk).step_token == 2


def test_messages_fetched_by_a_dead_worker_go_back_to_their_queue(registry, redis_db):
    # Given a worker that fetched the step message, then died (no heartbeat since)
    from dramatiq.brokers.redis import RedisBroker

    new_job(registry)
    broker = dramatiq.get_broker()
    doomed = RedisBroker(client=broker.client, namespace=broker.namespace, middleware=[])
    assert len(doomed.do_fetch("default", 10)) == 1
    assert queued_messages("default") == 0
    redis_db.zadd(f"{broker.namespace}:__heartbeats__", {doomed.broker_id: 0})

    # When maintenance runs
    run_maintenance()

    # Then the message is back on its queue for a live worker
    assert queued_messages("default") == 1
