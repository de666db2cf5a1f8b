"""Maintenance: stuck jobs, lost messages, lost places in line, dead workers, expired leases."""

import time
from datetime import timedelta

import dramatiq
import pytest
from django.utils import timezone

from jobs.models import Job, JobEvent, JobStatus, StepAttempt, StepState
from services_registry.models import Service
from orchestration.commands import submit_job
from orchestration.dispatch import DISPATCH_MARKER
from orchestration.messages import lease_member
from orchestration.per_process import get_limiter
from orchestration.maintenance import SUSPECT_KEY, run_maintenance
from tests.conftest import wait_for

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
    settings.CAO_REDISPATCH_GRACE_S = 5
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
    settings.CAO_REDISPATCH_GRACE_S = 5
    job = new_job(registry)
    age(job.pk, 30, times=["step_due_at"])

    report = run_maintenance()

    assert report.redispatched == 0
    assert Job.objects.get(pk=job.pk).step_token == 1
    assert queued_messages("default") == 1


def test_a_parked_step_that_lost_its_place_in_line_is_sent_again(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_S = 5
    job = new_job(registry)
    age(job.pk, 30, step_state=StepState.WAITING, times=["updated_at"])

    report = run_maintenance()

    job.refresh_from_db()
    assert report.redispatched == 1
    assert (job.step_state, job.step_token) == (StepState.QUEUED, 2)


def test_a_parked_step_still_in_line_is_left_alone(registry, settings):
    settings.CAO_REDISPATCH_GRACE_S = 5
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
    settings.CAO_REDISPATCH_GRACE_S = 5
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
    settings.CAO_REDISPATCH_GRACE_S = 5
    job = running_job(registry, seconds_ago=60)
    get_limiter().acquire("prompt_enhancer", lease_member(job.pk, 0, 1), limit=50, ttl_s=15, payload="p")

    run_maintenance()
    report = run_maintenance()

    assert report.lost_attempts == 0
    assert Job.objects.get(pk=job.pk).step_state == StepState.RUNNING


def test_a_lost_attempt_without_attempts_left_fails_the_job_retryable(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_S = 5
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
    wait_for(lambda: limiter.occupancy("video_gen_v2").in_use == 0, message="both leases to expire")

    report = run_maintenance()

    assert report.reaped_leases == 2
    assert report.handed_off == 1
    assert limiter.locate("video_gen_v2", "c") == "granted"
    assert queued_messages("heavy") == 1


def test_two_maintenance_runs_do_not_double_send(registry, settings, redis_db):
    settings.CAO_REDISPATCH_GRACE_S = 5
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


# --- Every lost step is found, and fast (issue: nothing lost) ---------------------------------


def test_a_first_sighting_outlives_the_gap_between_two_passes(registry, settings, redis_db):
    # prompt_enhancer's lease lives 15 s: a sighting kept 3 x 15 s would be
    # gone by the next pass, 60 s later, and the step never declared LOST.
    settings.CAO_REDISPATCH_GRACE_S = 5
    settings.SANITY_CHECK_INTERVAL_SECONDS = 60
    job = running_job(registry, seconds_ago=60)

    run_maintenance()

    ttl_ms = redis_db.pttl(SUSPECT_KEY.format(member=lease_member(job.pk, 0, 1)))
    assert ttl_ms > 2 * 60_000


def test_a_missing_lease_is_not_declared_lost_before_a_renewal_period_has_passed(registry, settings, redis_db):
    # A live worker re-adds a lease Redis forgot within ttl/3: two passes in
    # quick succession must not call its step lost (it would run twice).
    settings.CAO_REDISPATCH_GRACE_S = 5
    job = running_job(registry, seconds_ago=60)

    first, second = run_maintenance(), run_maintenance()

    assert (first.lost_attempts, second.lost_attempts) == (0, 0)
    assert Job.objects.get(pk=job.pk).step_state == StepState.RUNNING


def test_an_old_lost_step_is_found_behind_more_than_a_batch_of_healthy_waiters(registry, settings, redis_db):
    # Given an old job whose message was lost, and 510 newer healthy ones parked in line
    settings.CAO_REDISPATCH_GRACE_S = 5
    lost = new_job(registry)
    redis_db.delete(DISPATCH_MARKER.format(job_id=lost.pk))
    age(lost.pk, 3600, times=["created_at", "step_due_at"])
    limiter = get_limiter()
    limiter.acquire("prompt_enhancer", "blocker", limit=1, ttl_s=600, payload="x")
    now = timezone.now()
    waiters = Job.objects.bulk_create(
        Job(
            feature_name="business_plan", steps=lost.steps, status=JobStatus.PENDING, step_state=StepState.WAITING,
            context={}, step_due_at=now, last_progress_at=now,
        )
        for _ in range(510)
    )
    for waiter in waiters:
        limiter.acquire("prompt_enhancer", lease_member(waiter.pk, 0, 1), limit=1, ttl_s=15, payload="p")
    Job.objects.filter(pk__in=[w.pk for w in waiters]).update(updated_at=now - timedelta(seconds=60))

    # When maintenance runs
    report = run_maintenance()

    # Then the old job is re-sent, and none of the healthy ones
    assert report.redispatched == 1
    assert Job.objects.get(pk=lost.pk).step_token == 2


def test_a_pending_job_without_progress_is_failed_stuck(registry, settings):
    settings.JOB_STUCK_SECONDS = 60
    job = new_job(registry)  # PENDING: its first step never started
    age(job.pk, 120, times=["last_progress_at"])

    report = run_maintenance()

    assert report.stuck_failed == 1
    assert Job.objects.get(pk=job.pk).error_code == "STUCK_DETECTED"


def waiting_job(registry, *, step_index, status):
    job = new_job(registry)
    Job.objects.filter(pk=job.pk).update(status=status, step_state=StepState.WAITING, current_step_index=step_index)
    return Job.objects.get(pk=job.pk)


@pytest.mark.parametrize("step_index, status", [(0, JobStatus.PENDING), (1, JobStatus.RUNNING)])
def test_a_step_waiting_in_a_line_that_moves_is_not_stuck(registry, settings, step_index, status):
    # Given a job parked for longer than JOB_STUCK_SECONDS, keeping its place behind another waiter...
    settings.JOB_STUCK_SECONDS = 60
    job = waiting_job(registry, step_index=step_index, status=status)
    service = job.steps[step_index]
    Service.objects.filter(name=service).update(concurrency_limit=1)
    limiter = get_limiter()
    limiter.acquire(service, "ahead", limit=1, ttl_s=600, payload="x")
    limiter.acquire(service, "front", limit=1, ttl_s=600, payload="x")
    limiter.acquire(service, lease_member(job.pk, step_index, 1), limit=1, ttl_s=15, payload="p")
    age(job.pk, 120, times=["last_progress_at"])
    # ... in a line that moved just now: the slot went on to the waiter in front
    limiter.release(service, "ahead", limit=1)

    report = run_maintenance()

    assert report.stuck_failed == 0
    assert Job.objects.get(pk=job.pk).status == status
    assert limiter.locate(service, lease_member(job.pk, step_index, 1)) == "waiter"


def test_a_step_waiting_in_a_line_that_does_not_move_is_stuck(registry, settings, redis_db):
    settings.JOB_STUCK_SECONDS = 60
    job = waiting_job(registry, step_index=1, status=JobStatus.RUNNING)
    Service.objects.filter(name="fast_chat_llm").update(concurrency_limit=1)
    limiter = get_limiter()
    limiter.acquire("fast_chat_llm", "forever", limit=1, ttl_s=600, payload="x")
    limiter.acquire("fast_chat_llm", lease_member(job.pk, 1, 1), limit=1, ttl_s=15, payload="p")
    age(job.pk, 120, times=["last_progress_at"])
    # The last grant was longer ago than JOB_STUCK_SECONDS
    redis_db.set(limiter.keys("fast_chat_llm")[7], int((time.time() - 3600) * 1000))

    assert run_maintenance().stuck_failed == 1
    assert limiter.locate("fast_chat_llm", lease_member(job.pk, 1, 1)) is None  # its place is withdrawn


def test_a_deleted_jobs_reservation_does_not_block_the_line(registry, settings):
    # Given a limit of 1: job A was handed the slot (a reservation), then deleted; B waits behind it
    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    limiter = get_limiter()
    a, b = new_job(registry), new_job(registry)
    member_a, member_b = lease_member(a.pk, 0, 1), lease_member(b.pk, 0, 1)
    assert limiter.acquire("prompt_enhancer", "holder", limit=1, ttl_s=600, payload="h").granted
    for member, job in ((member_a, a), (member_b, b)):
        limiter.acquire("prompt_enhancer", member, limit=1, ttl_s=15, payload=f'["{job.pk}", 0, 1, "prompt_enhancer"]')
    Job.objects.filter(pk__in=[a.pk, b.pk]).update(step_state=StepState.WAITING)
    limiter.release("prompt_enhancer", "holder", limit=1)  # the slot is reserved for A
    assert limiter.locate("prompt_enhancer", member_a) == "granted"
    Job.objects.filter(pk=a.pk).delete()

    # When maintenance runs
    report = run_maintenance()

    # Then A's place is gone and the slot is B's
    assert report.orphans_removed == 1
    assert limiter.locate("prompt_enhancer", member_a) is None
    assert limiter.locate("prompt_enhancer", member_b) == "granted"


def test_a_waiter_of_a_finished_or_resent_job_leaves_the_line(registry):
    limiter = get_limiter()
    done, resent = new_job(registry), new_job(registry)
    limiter.acquire("prompt_enhancer", "holder", limit=1, ttl_s=600, payload="h")
    for job in (done, resent):
        limiter.acquire("prompt_enhancer", lease_member(job.pk, 0, 1), limit=1, ttl_s=15, payload="p")
    Job.objects.filter(pk=done.pk).update(status=JobStatus.CANCELLED, step_state=StepState.IDLE)
    Job.objects.filter(pk=resent.pk).update(step_token=2)

    assert run_maintenance().orphans_removed == 2
    assert [w.member for w in limiter.occupancy("prompt_enhancer").waiters] == []


def test_a_cancelled_jobs_call_whose_worker_died_is_closed(registry, settings, redis_db):
    # Given a cancelled job whose call was running when its worker died (no lease)
    settings.CAO_REDISPATCH_GRACE_S = 5
    job = running_job(registry, seconds_ago=60)
    Job.objects.filter(pk=job.pk).update(status=JobStatus.CANCELLED)
    redis_db.set(SUSPECT_KEY.format(member=lease_member(job.pk, 0, 1)), 0)  # seen missing long ago

    report = run_maintenance()

    job.refresh_from_db()
    assert report.lost_attempts == 1
    assert (job.status, job.step_state) == (JobStatus.CANCELLED, StepState.IDLE)
    assert StepAttempt.objects.get(job=job, token=1).outcome == "LOST"
    assert queued_messages("default") == 1  # only the job's first message: nothing is re-sent


def test_after_a_redis_loss_queued_steps_are_resent_at_once_delayed_retries_keep_their_delay(registry, settings, redis_db):
    # Given a step queued a moment ago and a retry due in 30 s, both lost with Redis
    settings.CAO_REDISPATCH_GRACE_S = 30
    fresh, retry = new_job(registry), new_job(registry)
    Job.objects.filter(pk=retry.pk).update(step_due_at=timezone.now() + timedelta(seconds=30))
    redis_db.flushdb()

    # When maintenance runs knowing Redis lost its data
    report = run_maintenance(after_redis_loss=True)

    # Then both are re-sent now, without waiting for the grace
    assert report.redispatched == 2
    broker = dramatiq.get_broker()
    assert queued_messages("default") == 1
    assert broker.client.llen(f"{broker.namespace}:default.DQ") == 1
    assert Job.objects.get(pk=fresh.pk).step_token == 2
