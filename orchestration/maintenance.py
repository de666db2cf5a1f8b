"""Periodic maintenance: the safety net under the step messages.

- reap expired leases and re-hand lapsed reservations to waiters;
- fail jobs that made no progress for JOB_STUCK_SECONDS (retryable);
- re-send work whose message, place in line or lease vanished (a worker died,
  Redis restarted without persistence).

Safe to run from two schedulers at once: every job is re-checked under its
row lock (rows locked by the other run are skipped), and a re-sent step gets
a fresh token, so at most one of its messages can ever act.
"""

import logging
import time
from dataclasses import dataclass
from datetime import timedelta

import dramatiq
from django.conf import settings
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.common import dq_name
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from common.after_commit import after_commit
from common.redis import get_redis
from jobs import services as job_services
from jobs.models import ACTIVE_STATUSES, AttemptOutcome, Job, JobStatus, StepState
from orchestration import errors
from orchestration.engine import failure_from
from orchestration.dispatch import dispatched_token, release_step, send_after_commit, send_handoffs
from orchestration.leases import get_limiter, lease_member
from services_registry.selectors import service_list

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
# A lease seen missing is only declared lost when still missing on a later
# run: a live worker re-adds a lease Redis forgot at its next renewal.
SUSPECT_KEY = "cao:suspect:{member}"


@dataclass
class MaintenanceReport:
    reaped_leases: int = 0
    handed_off: int = 0
    stuck_failed: int = 0
    redispatched: int = 0
    lost_attempts: int = 0


def run_maintenance(*, now=None):
    """One maintenance pass; returns what it did."""
    now = now or timezone.now()
    report = MaintenanceReport()
    return_messages_of_dead_workers()
    reap_leases(report)
    fail_stuck_jobs(report, now=now)
    redispatch_lost_work(report, now=now)
    return report


def return_messages_of_dead_workers():
    """Put messages that dead workers had fetched back on their queues (Redis broker).

    Dramatiq does this itself, but only on a random 0.1% of its commands; a
    killed worker's prefetched messages could sit for many minutes. Sweeping
    every pass bounds that by CAO_BROKER_HEARTBEAT_TIMEOUT_MS plus one interval.
    RabbitMQ returns a dead consumer's messages by itself.
    """
    broker = dramatiq.get_broker()
    if not isinstance(broker, RedisBroker):
        return
    sweeper = RedisBroker(
        client=broker.client,
        namespace=broker.namespace,
        heartbeat_timeout=broker.heartbeat_timeout,
        maintenance_chance=MAINTENANCE_SCALE,  # every command sweeps
        middleware=[],
    )
    for queue in settings.CAO_QUEUES:
        for name in (queue, dq_name(queue)):
            sweeper.do_qsize(name)


def reap_leases(report):
    limiter = get_limiter()
    for service in service_list():
        report.reaped_leases += limiter.reap(service.name)
        handoffs = limiter.redispatch_waiters(service.name, limit=service.concurrency_limit)
        report.handed_off += len(handoffs)
        send_handoffs(handoffs)


def fail_stuck_jobs(report, *, now):
    cutoff = now - timedelta(seconds=settings.JOB_STUCK_SECONDS)
    candidates = Job.objects.filter(status=JobStatus.RUNNING, last_progress_at__lt=cutoff).values_list("id", flat=True)
    for job_id in list(candidates[:BATCH_SIZE]):
        with transaction.atomic():
            job = _lock_if(job_id, Q(status=JobStatus.RUNNING, last_progress_at__lt=cutoff))
            if job is None:
                continue
            withdrawn = job_services.current_step(job) if job.step_state != StepState.RUNNING else None
            job_services.job_fail(
                job=job,
                failure=failure_from(
                    errors.StuckDetected(
                        f"No progress for {settings.JOB_STUCK_SECONDS} s; resume the job to try again."
                    )
                ),
            )
            if withdrawn:
                after_commit(release_step, withdrawn)
        report.stuck_failed += 1
        logger.warning("Marked job_id=%s as FAILED STUCK_DETECTED.", job_id)


def redispatch_lost_work(report, *, now):
    grace = timedelta(seconds=settings.CAO_REDISPATCH_GRACE_SECONDS)
    candidates = Job.objects.filter(status__in=ACTIVE_STATUSES).filter(
        Q(step_state=StepState.QUEUED, step_due_at__lt=now - grace)
        | Q(step_state=StepState.WAITING, updated_at__lt=now - grace)
        | Q(step_state=StepState.RUNNING, step_started_at__lt=now - grace)
    )
    services = {service.name: service for service in service_list()}
    for job_id in list(candidates.values_list("id", flat=True)[:BATCH_SIZE]):
        with transaction.atomic():
            job = _lock_if(job_id, Q(status__in=ACTIVE_STATUSES))
            if job is None:
                continue
            if job.step_state == StepState.QUEUED:
                _redispatch_if_unsent(job, report, now=now, grace=grace)
            elif job.step_state == StepState.WAITING:
                _redispatch_if_unparked(job, report, now=now, grace=grace)
            elif job.step_state == StepState.RUNNING:
                _recover_if_lost(job, report, services.get(job.current_service), now=now, grace=grace)


def _redispatch_if_unsent(job, report, *, now, grace):
    if job.step_due_at is None or job.step_due_at >= now - grace:
        return
    if dispatched_token(job.id) == job.step_token:
        return  # the message is still in the broker (possibly behind a backlog)
    send_after_commit(job_services.step_requeue(job=job))
    report.redispatched += 1
    logger.warning("Re-sent the lost step message of job_id=%s step_index=%s.", job.id, job.current_step_index)


def _redispatch_if_unparked(job, report, *, now, grace):
    if job.updated_at >= now - grace:
        return
    member = lease_member(job.id, job.current_step_index, job.step_token)
    if get_limiter().locate(job.current_service, member) is not None:
        return
    send_after_commit(job_services.step_requeue(job=job))
    report.redispatched += 1
    logger.warning("Re-sent job_id=%s step_index=%s: its place in line was lost.", job.id, job.current_step_index)


def _recover_if_lost(job, report, service, *, now, grace):
    if job.step_started_at is None or job.step_started_at >= now - grace:
        return
    member = lease_member(job.id, job.current_step_index, job.step_token)
    if get_limiter().locate(job.current_service, member) is not None:
        get_redis().delete(SUSPECT_KEY.format(member=member))
        return
    ttl_s = service.lease_ttl_s if service else 60.0
    # First sighting: remember it; a live worker re-adds its lease within
    # ttl/3, so only a lease still missing after that means a dead worker.
    key = SUSPECT_KEY.format(member=member)
    first_seen = get_redis().get(key)
    if first_seen is None:
        get_redis().set(key, time.time(), px=int(ttl_s * 3000))
        return
    if time.time() - float(first_seen) < ttl_s / 3 + 1:
        return
    max_attempts = service.max_attempts if service else job.step_attempt
    error = errors.WorkerLost("The worker running this attempt stopped before it finished.")
    retry_now = 0.0 if job.step_attempt < max_attempts else None
    outcome = job_services.step_fail(
        job=job, token=job.step_token, failure=failure_from(error), retry_delay_s=retry_now,
        outcome=AttemptOutcome.LOST,
    )
    if outcome.dispatch:
        send_after_commit(outcome.dispatch)
    report.lost_attempts += 1
    logger.warning(
        "Recovered job_id=%s step_index=%s: its worker vanished mid-call (attempt %s).",
        job.id, job.current_step_index, job.step_attempt,
    )


def _lock_if(job_id, condition):
    # skip_locked: a job another scheduler (or a worker) is busy with is left
    # for the next run instead of being waited on.
    return Job.objects.select_for_update(skip_locked=True).filter(condition, pk=job_id).first()
