"""Periodic maintenance: the safety net under the step messages.

- reap expired leases, re-hand lapsed reservations, and drop places in line
  (and reservations) of steps that no longer wait: a deleted, finished or
  re-sent job must not block the line;
- fail jobs that made no progress for JOB_STUCK_SECONDS (retryable), except
  a step waiting in a line that moves;
- fail jobs whose deadline passed while their step waited to start;
- re-send work whose message, place in line or lease vanished (a worker
  died, Redis restarted without persistence), oldest jobs first, every job
  of every pass;
- re-send the message of webhook deliveries that are due but whose message
  was lost, or whose attempt's lease lapsed (``webhooks.services.redispatch_lost``).

``orchestration.recovery`` runs the fast part (dead processes, Redis data
loss) within a tick; this pass catches the rest.

Safe to run from two schedulers at once: every job is re-checked under its
row lock (rows locked by the other run are skipped), and a re-sent step gets
a fresh token, so at most one of its messages can ever act.
"""

import logging
from dataclasses import dataclass
from datetime import timedelta

import dramatiq
from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from dramatiq.brokers.redis import MAINTENANCE_SCALE, RedisBroker
from dramatiq.common import dq_name

from common.after_commit import after_commit
from common.redis import get_redis
from jobs import steps as job_steps
from jobs.state import current_step
from jobs.models import ACTIVE_STATUSES, AttemptOutcome, Job, JobStatus, StepState
from orchestration import errors
from orchestration.dispatch import DISPATCH_MARKER, dispatched_token, send_after_commit
from orchestration.admission import admit_everywhere
from orchestration.slots import release_member, release_step, send_handoffs
from orchestration.errors import failure_from
from orchestration.messages import lease_member, parse_member
from orchestration.per_process import get_limiter
from services_registry.selectors import service_list
from webhooks import services as webhook_services

logger = logging.getLogger(__name__)

BATCH_SIZE = 500
# A lease seen missing is only declared lost when still missing on a later
# run: a live worker re-adds a lease Redis forgot at its next renewal.
SUSPECT_KEY = "cao:suspect:{member}"
# Where the limiter says a member stands while it still waits for a slot.
IN_LINE = ("waiter", "granted")

# The columns every check needs, read without locks; a job is locked only
# once these say something is wrong with it.
_ROW = (
    "id", "status", "step_state", "current_step_index", "step_token", "steps", "step_due_at",
    "step_started_at", "updated_at", "last_progress_at", "created_at",
)


@dataclass
class MaintenanceReport:
    reaped_leases: int = 0
    handed_off: int = 0
    orphans_removed: int = 0
    stuck_failed: int = 0
    deadline_failed: int = 0
    redispatched: int = 0
    lost_attempts: int = 0
    admitted: int = 0  # held jobs let in: their keys had a free place
    webhooks_redispatched: int = 0

    @property
    def changed(self):
        return any(vars(self).values())


def run_maintenance(*, now=None, after_redis_loss=False):
    """One maintenance pass; returns what it did.

    ``after_redis_loss``: Redis is known to have lost its data (a restart
    was seen), so a queued step without its marker, or a waiting step
    without its place in line, is re-sent at once instead of after
    CAO_REDISPATCH_GRACE_S.
    """
    now = now or timezone.now()
    report = MaintenanceReport()
    return_messages_of_dead_workers()
    reap_leases(report)
    sweep_orphans(report)
    fail_stuck_jobs(report, now=now)
    fail_jobs_past_deadline(report, now=now)
    redispatch_lost_work(report, now=now, after_redis_loss=after_redis_loss)
    report.admitted += admit_everywhere()
    report.webhooks_redispatched = webhook_services.redispatch_lost(now=now, after_redis_loss=after_redis_loss)
    return report


def return_messages_of_dead_workers():
    """Put messages that dead workers had fetched back on their queues (Redis broker).

    Dramatiq does this itself, but only on a random 0.1% of its commands; a
    killed worker's prefetched messages could sit for many minutes. Sweeping
    every pass bounds that by CAO_BROKER_HEARTBEAT_TIMEOUT_MS plus one interval.
    RabbitMQ returns a dead consumer's messages by itself.

    Relies on Dramatiq 2.x's Redis broker: every command it sends (here
    ``qsize``) runs its dispatch script, which requeues the messages of
    workers whose heartbeat lapsed when ``maintenance_chance`` says so.
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
    for queue in (*settings.CAO_QUEUES, settings.CAO_WEBHOOK_QUEUE):
        for name in (queue, dq_name(queue)):
            sweeper.do_qsize(name)
    # Each command also recorded the sweeper as a live worker; it is not one.
    broker.client.zrem(f"{broker.namespace}:__heartbeats__", sweeper.broker_id)


def reap_leases(report, services=None):
    limiter = get_limiter()
    for service in services if services is not None else service_list():
        report.reaped_leases += limiter.reap(service.name)
        handoffs = limiter.redispatch_waiters(service.name, limit=service.concurrency_limit)
        report.handed_off += len(handoffs)
        send_handoffs(handoffs)


def sweep_orphans(report):
    """Withdraw places in line (and reservations) of steps that no longer wait for them.

    A waiter whose job was deleted, finished, or re-sent under a newer token
    would keep its place forever, and a reservation handed to it would be
    handed to it again each time it lapsed: with a limit of 1, everyone
    behind it would wait forever. Holders are left alone: a holder's call
    may really be running, and its lease ends with it.
    """
    limiter = get_limiter()
    for service in service_list():
        waiting = [waiter.member for waiter in limiter.occupancy(service.name).waiters]
        steps = {member: parse_member(member) for member in waiting}
        steps = {member: step for member, step in steps.items() if step}
        if not steps:
            continue
        jobs = {
            str(row["id"]): row
            for row in Job.objects.filter(pk__in={job_id for job_id, _, _ in steps.values()}).values(*_ROW)
        }
        for member, (job_id, step_index, token) in steps.items():
            job = jobs.get(job_id)
            if job is not None and _still_waits(job, step_index, token):
                continue
            report.orphans_removed += 1
            release_member(service.name, member, limit=service.concurrency_limit, limiter=limiter)
            logger.warning("Removed %s from the line of %s: its job %s.", member, service.name,
                           "was deleted" if job is None else f"is {job['status']} at token {job['step_token']}")


def _still_waits(job, step_index, token):
    # A step parks inside its claim transaction, before the commit: the row
    # still says QUEUED then, under the same token.
    return (
        job["status"] in ACTIVE_STATUSES
        and job["current_step_index"] == step_index
        and job["step_token"] == token
        and job["step_state"] in (StepState.QUEUED, StepState.WAITING)
    )


def fail_stuck_jobs(report, *, now):
    """Fail active jobs without progress for JOB_STUCK_SECONDS, but not a step in a moving line.

    Parking is not progress, but a step that keeps its place in a line whose
    service granted a slot within that time is waiting its turn, not stuck;
    nor is a job HELD for one of its key's places (it starts when one of the
    key's running jobs ends, and those are checked here).
    """
    stuck_s = settings.JOB_STUCK_SECONDS
    cutoff = now - timedelta(seconds=stuck_s)
    limiter = get_limiter()
    candidates = Job.objects.filter(status__in=ACTIVE_STATUSES, last_progress_at__lt=cutoff).exclude(
        step_state=StepState.HELD
    )
    for rows in _batches(candidates):
        waiting = [row for row in rows if row["step_state"] == StepState.WAITING and _service_of(row)]
        places = _locate(limiter, waiting)
        moved = {service: limiter.last_moved(service) for service in {_service_of(row) for row in waiting}}
        for row in rows:
            if row["id"] in places and places[row["id"]] in IN_LINE:
                last = moved.get(_service_of(row))
                if last is not None and last >= now.timestamp() - stuck_s:
                    continue  # its line moves
            _fail_stuck(row["id"], cutoff, report)


def _fail_stuck(job_id, cutoff, report):
    with transaction.atomic():
        job = _lock_if(job_id, Q(status__in=ACTIVE_STATUSES, last_progress_at__lt=cutoff) & ~Q(step_state=StepState.HELD))
        if job is None:
            return
        withdrawn = current_step(job) if job.step_state != StepState.RUNNING else None
        job_steps.job_fail(
            job=job,
            failure=failure_from(
                errors.StuckDetected(f"No progress for {settings.JOB_STUCK_SECONDS} s; resume the job to try again.")
            ),
        )
        if withdrawn and withdrawn.service:
            after_commit(release_step, withdrawn)
    report.stuck_failed += 1
    logger.warning("Marked job_id=%s as FAILED STUCK_DETECTED.", job_id)


def fail_jobs_past_deadline(report, *, now):
    """Fail jobs whose deadline passed while their step waited (queued, in a service's line, or held for a key's place).

    A running call is cut off at the deadline by its worker, and a step
    message that arrives late is failed by its claim; this catches the jobs
    that would otherwise wait for a slot long after their client gave up.
    """
    waiting = Q(
        status__in=ACTIVE_STATUSES, deadline_at__lte=now,
        step_state__in=[StepState.QUEUED, StepState.WAITING, StepState.HELD],
    )
    for job_id in Job.objects.filter(waiting).values_list("id", flat=True).iterator():
        with transaction.atomic():
            job = _lock_if(job_id, waiting)
            if job is None:
                continue
            withdrawn = current_step(job) if job.step_state != StepState.HELD else None
            job_steps.job_fail(
                job=job,
                failure=failure_from(errors.DeadlineExceeded(
                    f"The job's deadline ({job.deadline_at.isoformat()}) passed while step "
                    f"{job.current_step_index + 1} of {job.total_steps} waited to start.",
                    call_cut_off=False,
                )),
            )
            if withdrawn and withdrawn.service:
                after_commit(release_step, withdrawn)
        report.deadline_failed += 1
        logger.warning("Marked job_id=%s as FAILED DEADLINE_EXCEEDED.", job_id)


def redispatch_lost_work(report, *, now, after_redis_loss=False):
    grace = timedelta(seconds=0 if after_redis_loss else settings.CAO_REDISPATCH_GRACE_S)
    # After a loss every queued step's message is gone, due or not yet (a
    # delayed retry); otherwise only one overdue by the grace is suspect.
    queued = Q(step_state=StepState.QUEUED)
    if not after_redis_loss:
        queued &= Q(step_due_at__lt=now - grace)
    candidates = Job.objects.filter(
        Q(status__in=ACTIVE_STATUSES)
        & (
            queued
            | Q(step_state=StepState.WAITING, updated_at__lt=now - grace)
            | Q(step_state=StepState.RUNNING, step_started_at__lt=now - grace)
        )
        # A cancelled job's call still runs to its end; if its worker died,
        # the attempt must be closed all the same.
        | Q(status=JobStatus.CANCELLED, step_state=StepState.RUNNING, step_started_at__lt=now - grace)
    )
    services = {service.name: service for service in service_list()}
    limiter = get_limiter()
    client = get_redis()
    for rows in _batches(candidates):
        queued = [row for row in rows if row["step_state"] == StepState.QUEUED]
        markers = client.mget([DISPATCH_MARKER.format(job_id=row["id"]) for row in queued]) if queued else []
        sent = {row["id"]: marker for row, marker in zip(queued, markers)}
        places = _locate(limiter, [row for row in rows if row["step_state"] != StepState.QUEUED])
        for row in rows:
            if row["step_state"] == StepState.QUEUED:
                if sent.get(row["id"]) != str(row["step_token"]):
                    _redispatch_if_unsent(row["id"], report, now=now, grace=grace, after_redis_loss=after_redis_loss)
            elif row["step_state"] == StepState.WAITING:
                if places.get(row["id"]) not in IN_LINE:
                    _redispatch_if_unparked(row["id"], report, now=now, grace=grace)
            elif places.get(row["id"]) != "holder":
                _recover_if_lost(row["id"], report, services.get(_service_of(row)), now=now, grace=grace)
            else:
                get_redis().delete(SUSPECT_KEY.format(member=_member_of(row)))


def _redispatch_if_unsent(job_id, report, *, now, grace, after_redis_loss):
    with transaction.atomic():
        job = _lock_if(job_id, Q(status__in=ACTIVE_STATUSES, step_state=StepState.QUEUED))
        if job is None or job.step_due_at is None:
            return
        if not after_redis_loss and job.step_due_at >= now - grace:
            return
        if dispatched_token(job.id) == job.step_token:
            return  # the message is still in the broker (possibly behind a backlog)
        # A retry not yet due keeps its delay (its delayed message was lost too).
        delay_s = max(0.0, (job.step_due_at - now).total_seconds())
        send_after_commit(job_steps.step_requeue(job=job, delay_s=delay_s))
    report.redispatched += 1
    logger.warning("Re-sent the lost step message of job_id=%s step_index=%s.", job.id, job.current_step_index)


def _redispatch_if_unparked(job_id, report, *, now, grace):
    with transaction.atomic():
        job = _lock_if(job_id, Q(status__in=ACTIVE_STATUSES, step_state=StepState.WAITING, updated_at__lt=now - grace))
        if job is None:
            return
        member = lease_member(job.id, job.current_step_index, job.step_token)
        if get_limiter().locate(job.current_service, member) is not None:
            return
        send_after_commit(job_steps.step_requeue(job=job))
    report.redispatched += 1
    logger.warning("Re-sent job_id=%s step_index=%s: its place in line was lost.", job.id, job.current_step_index)


def _recover_if_lost(job_id, report, service, *, now, grace):
    with transaction.atomic():
        job = _lock_if(job_id, Q(step_state=StepState.RUNNING, step_started_at__lt=now - grace))
        if job is None:
            return
        member = lease_member(job.id, job.current_step_index, job.step_token)
        client = get_redis()
        key = SUSPECT_KEY.format(member=member)
        if get_limiter().locate(job.current_service, member) is not None:
            client.delete(key)
            return
        ttl_s = service.lease_ttl_s if service else 60.0
        # First sighting: remember it (by Redis's clock, which every
        # scheduler shares); a live worker re-adds a lease Redis forgot
        # within ttl/3, so only a lease still missing after that means a
        # dead worker. The sighting must outlive the gap between two passes.
        server_now = _server_time(client)
        first_seen = client.get(key)
        if first_seen is None:
            keep_s = max(3 * ttl_s, 3 * settings.SANITY_CHECK_INTERVAL_SECONDS + ttl_s)
            client.set(key, server_now, px=int(keep_s * 1000))
            return
        if server_now - float(first_seen) < ttl_s / 3 + 1:
            return
        mark_attempt_lost(job, service)
        client.delete(key)
    report.lost_attempts += 1


def mark_attempt_lost(job, service):
    """Record the locked job's running attempt as LOST and retry the step (or fail the job).

    A cancelled job's attempt is closed and nothing more runs.
    """
    max_attempts = service.max_attempts if service else job.step_attempt
    error = errors.WorkerLost("The worker running this attempt stopped before it finished.")
    retry_now = 0.0 if job.step_attempt < max_attempts else None
    outcome = job_steps.step_fail(
        job=job, token=job.step_token, failure=failure_from(error), retry_delay_s=retry_now,
        outcome=AttemptOutcome.LOST,
    )
    if outcome.dispatch:
        send_after_commit(outcome.dispatch)
    logger.warning(
        "Recovered job_id=%s step_index=%s: its worker vanished mid-call (attempt %s).",
        job.id, job.current_step_index, job.step_attempt,
    )
    return outcome


# --- helpers ----------------------------------------------------------------


def _batches(queryset):
    """Every row of ``queryset`` (as dicts of _ROW), oldest job first, BATCH_SIZE at a time.

    Keyset pagination on (created_at, id): no row is skipped or repeated
    while the pass changes the rows it already went through.
    """
    queryset = queryset.order_by("created_at", "id")
    cursor = None
    while True:
        page = queryset
        if cursor is not None:
            page = page.filter(Q(created_at__gt=cursor[0]) | Q(created_at=cursor[0], id__gt=cursor[1]))
        rows = list(page.values(*_ROW)[:BATCH_SIZE])
        if not rows:
            return
        yield rows
        cursor = (rows[-1]["created_at"], rows[-1]["id"])


def _service_of(row):
    index, steps = row["current_step_index"], row["steps"]
    return steps[index] if index < len(steps) else None


def _member_of(row):
    return lease_member(row["id"], row["current_step_index"], row["step_token"])


def _locate(limiter, rows):
    """Where each row's current step stands in its service's limiter, by job id (one pipeline)."""
    rows = [row for row in rows if _service_of(row)]
    found = limiter.locate_many([(_service_of(row), _member_of(row)) for row in rows])
    return {row["id"]: place for row, place in zip(rows, found)}


def _server_time(client):
    seconds, microseconds = client.time()
    return seconds + microseconds / 1_000_000


def _lock_if(job_id, condition):
    # skip_locked: a job another scheduler (or a worker) is busy with is left
    # for the next run instead of being waited on.
    return Job.objects.select_for_update(skip_locked=True).filter(condition, pk=job_id).first()
