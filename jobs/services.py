"""Every change to a job's state, and the events that describe it.

Functions taking a ``job`` expect it locked (``lock_job`` inside
``transaction.atomic()``): the row lock serialises racing actors and makes
event seq numbers gapless. The step lifecycle's functions also take a
``writer``: with ``jobs.writes.ConditionalWrite`` the job may be one read
without a lock, and the whole transition is written in one statement only
if the row has not moved since. They never send messages; they return the
step message to send (``StepDispatch``) and the caller sends it after commit.
"""

import json
import re
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from common.errors import InvalidInput
from common.metrics import JOBS_COMPLETED, JOBS_FAILED, STEP_RETRIES
from common.json_values import unstorable_reason
from jobs import errors
from jobs.events import CONTACT_SUPPORT, RETRY_AVAILABLE, append_events, event
from jobs.writes import LOCKED
from jobs.models import (
    TERMINAL_STATUSES,
    TRANSITIONS,
    AttemptOutcome,
    EventType,
    Job,
    JobStatus,
    StepAttempt,
    StepState,
    step_key,
)
from services_registry.selectors import recipe_snapshot


@dataclass(frozen=True)
class StepDispatch:
    """A step message to send once the transaction commits."""

    job_id: object
    step_index: int
    token: int
    service: str
    delay_s: float = 0.0


@dataclass(frozen=True)
class StepRef:
    """The current step of a job under a given token (what a lease is named after)."""

    job_id: object
    step_index: int
    token: int
    service: str


@dataclass(frozen=True)
class Failure:
    """Why an attempt failed, as recorded on the attempt and the job."""

    code: str
    message: str
    retryable: bool
    http_status: int | None = None


@dataclass(frozen=True)
class ResumeOutcome:
    job: Job
    previous_status: str
    dispatch: StepDispatch


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    previous_status: str
    # The parked or queued step to withdraw from its service's waiting line.
    withdrawn: StepRef | None


@dataclass(frozen=True)
class RecordOutcome:
    """What recording an attempt's result led to."""

    accepted: bool
    dispatch: StepDispatch | None = None


# The engine locks the job twice per step: written out, the statement skips
# the ORM's query compiler, which was a quarter of a worker's CPU per step.
LOCK_JOB_SQL = f"SELECT * FROM {Job._meta.db_table} WHERE id = %s FOR UPDATE"


READ_JOB_SQL = f"SELECT * FROM {Job._meta.db_table} WHERE id = %s"


def lock_job(job_id):
    """The job with its row locked until the transaction ends, or None."""
    return next(iter(Job.objects.raw(LOCK_JOB_SQL, [str(job_id)])), None)


def read_job(job_id):
    """The job as it is now, without a lock (for a conditional write), or None."""
    return next(iter(Job.objects.raw(READ_JOB_SQL, [str(job_id)])), None)


def current_step(job):
    return StepRef(job.id, job.current_step_index, job.step_token, job.current_service)


def current_dispatch(job, delay_s=0.0):
    return StepDispatch(job.id, job.current_step_index, job.step_token, job.current_service, delay_s)


def _set_status(job, status):
    if status not in TRANSITIONS[JobStatus(job.status)]:
        raise errors.IllegalTransition(f"A {job.status} job cannot become {status}.")
    job.status = status


def _save(job, *fields, writer=LOCKED):
    writer.save(job, fields)


def _next_token(job, *, now, delay_s=0.0):
    """Queue the current step under a fresh token, due after ``delay_s``."""
    job.step_state = StepState.QUEUED
    job.step_token += 1
    job.step_due_at = now + timedelta(seconds=delay_s)


# --- Client operations ------------------------------------------------------


FEATURE_NAME = re.compile(r"[-a-zA-Z0-9_]{1,64}")


def check_input_data(input_data):
    """Refuse input_data that is not an object, too deep, unstorable, or too big."""
    if not isinstance(input_data, dict):
        raise InvalidInput("input_data must be a JSON object.", details={"input_data": "expected an object"})
    reason = unstorable_reason(input_data, max_depth=settings.CAO_MAX_INPUT_DEPTH)
    if reason:
        raise InvalidInput(f"input_data {reason}.", details={"input_data": reason})
    size = len(json.dumps(input_data, ensure_ascii=False).encode())
    if size > settings.CAO_MAX_INPUT_BYTES:
        raise InvalidInput(
            f"input_data is {size} bytes once encoded; the limit is {settings.CAO_MAX_INPUT_BYTES}.",
            details={"input_data": "too large"},
        )


def job_create(*, feature_name, input_data, owner=None, idempotency_key=None):
    """Create a PENDING job for ``feature_name``; returns ``(job, created)``.

    With an ``idempotency_key`` already used by the same owner, returns that
    job (``created`` False) instead of creating another one.
    """
    check_input_data(input_data)
    if idempotency_key:
        existing = _job_for_idempotency_key(owner, idempotency_key, feature_name, input_data)
        if existing:
            return existing, False
    steps = _runnable_steps(feature_name)
    now = timezone.now()
    try:
        with _alone_or_in_a_savepoint():
            job = Job.objects.create(
                feature_name=feature_name,
                steps=steps,
                owner=owner,
                idempotency_key=idempotency_key or None,
                context={"initial_input": input_data},
                step_due_at=now,
                last_progress_at=now,
            )
    except IntegrityError:
        # A concurrent request with the same key won the insert.
        existing = _job_for_idempotency_key(owner, idempotency_key, feature_name, input_data)
        if existing is None:
            raise
        return existing, False
    return job, True


def _alone_or_in_a_savepoint():
    """Outside a transaction, one statement commits by itself (no BEGIN, no COMMIT).

    Inside one, a savepoint keeps the caller's transaction usable after the
    statement fails (a concurrent request won the same idempotency key).
    """
    return transaction.atomic() if transaction.get_connection().in_atomic_block else nullcontext()


def _runnable_steps(feature_name):
    recipe = recipe_snapshot(feature_name) if FEATURE_NAME.fullmatch(feature_name) else None
    if recipe is None:
        raise errors.UnknownFeature(
            f"Unknown feature {feature_name[:64]!r}; GET /api/v1/features lists them."
        )
    if not recipe.enabled:
        raise errors.FeatureUnavailable(f"Feature {feature_name!r} is disabled.")
    if not recipe.steps:
        raise errors.FeatureUnavailable(f"Feature {feature_name!r} has no steps.")
    if recipe.disabled_services:
        raise errors.FeatureUnavailable(
            f"Feature {feature_name!r} is unavailable: service {', '.join(recipe.disabled_services)} is disabled."
        )
    return list(recipe.steps)


def _job_for_idempotency_key(owner, key, feature_name, input_data):
    job = Job.objects.filter(owner=owner, idempotency_key=key).first()
    if job and (job.feature_name != feature_name or job.context.get("initial_input") != input_data):
        raise errors.IdempotencyKeyReused(
            "This Idempotency-Key was already used for a different request; use a new key."
        )
    return job


def job_resume(*, job, force=False):
    """FAILED -> RUNNING from the current step, with a fresh attempt budget."""
    if job.status != JobStatus.FAILED:
        raise errors.JobNotResumable(
            f"The job is {job.status}; only FAILED jobs can be resumed.",
            details={"status": job.status},
        )
    if not job.retryable and not force:
        raise errors.JobNotResumable(
            f"The job failed with a non-retryable error ({job.error_code or 'unknown'}); fix the cause, "
            "then resume with force (staff only).",
            details={"status": job.status, "error_code": job.error_code, "retryable": False},
        )
    now = timezone.now()
    previous_status = job.status
    forced = bool(force and not job.retryable)
    _set_status(job, JobStatus.RUNNING)
    _next_token(job, now=now)
    job.step_attempt = 0
    job.error_code, job.error_message, job.retryable = "", "", False
    job.finished_at = None
    job.last_progress_at = now
    append_events(
        job,
        event(
            EventType.JOB_RESUMED,
            step_index=job.current_step_index,
            message=f"Resumed from step {job.current_step_index + 1} of {job.total_steps}.",
            previous_status=previous_status,
            forced=forced,
        ),
        now=now,
    )
    _save(
        job, "status", "step_state", "step_token", "step_due_at", "step_attempt", "error_code",
        "error_message", "retryable", "finished_at", "last_progress_at",
    )
    return ResumeOutcome(job, previous_status, current_dispatch(job))


def job_cancel(*, job):
    """Stop the job: no further step starts. A call in flight finishes and is recorded."""
    if job.status in TERMINAL_STATUSES:
        raise errors.JobNotCancellable(f"The job is already {job.status}.", details={"status": job.status})
    now = timezone.now()
    previous_status = job.status
    withdrawn = None
    if job.step_state in (StepState.QUEUED, StepState.WAITING):
        withdrawn = current_step(job)
    _set_status(job, JobStatus.CANCELLED)
    if job.step_state != StepState.RUNNING:
        job.step_state = StepState.IDLE
    job.finished_at = now
    append_events(
        job,
        event(
            EventType.JOB_CANCELLED,
            step_index=job.current_step_index if job.current_service else None,
            message="The job was cancelled.",
            previous_status=previous_status,
        ),
        now=now,
    )
    _save(job, "status", "step_state", "finished_at")
    return CancelOutcome(job, previous_status, withdrawn)


# --- Step lifecycle (called by the engine) -----------------------------------


def step_is_current(job, *, step_index, token):
    """Whether a message for (step_index, token) may act on the locked job."""
    return (
        job.status in (JobStatus.PENDING, JobStatus.RUNNING)
        and job.current_step_index == step_index
        and job.step_token == token
        and job.step_state in (StepState.QUEUED, StepState.WAITING)
    )


def step_park(*, job, position=None, writer=LOCKED):
    """No free slot: the step waits in its service's line, holding no thread."""
    first_time = job.step_state == StepState.QUEUED
    job.step_state = StepState.WAITING
    if first_time:
        append_events(
            job,
            event(
                EventType.WAITING_FOR_SLOT,
                step_index=job.current_step_index,
                message=f"Waiting for a free slot of {job.current_service}.",
                position=position,
            ),
            writer=writer,
        )
    _save(job, "step_state", writer=writer)


def step_claim(*, job, max_attempts, writer=LOCKED):
    """Slot granted: the attempt starts. Returns the new StepAttempt."""
    now = timezone.now()
    _set_status(job, JobStatus.RUNNING)
    job.step_state = StepState.RUNNING
    job.step_attempt += 1
    job.step_started_at = now
    job.last_progress_at = now
    attempt = StepAttempt(
        job=job,
        step_index=job.current_step_index,
        service=job.current_service,
        attempt=job.step_attempt,
        token=job.step_token,
        started_at=now,
    )
    writer.create_attempt(attempt)
    append_events(
        job,
        event(
            EventType.STEP_STARTED,
            step_index=job.current_step_index,
            message=f"Calling {job.current_service} (attempt {job.step_attempt} of {max_attempts}).",
            attempt=job.step_attempt,
            max_attempts=max_attempts,
        ),
        now=now,
        writer=writer,
    )
    _save(job, "status", "step_state", "step_attempt", "step_started_at", "last_progress_at", writer=writer)
    return attempt


def _is_recordable(job, token):
    return job.step_token == token and job.step_state == StepState.RUNNING


def _finish_attempt(job, token, outcome, now, *, http_status=None, failure=None, writer=LOCKED):
    started = job.step_started_at or now
    writer.finish_attempt(
        job,
        token,
        outcome=outcome,
        finished_at=now,
        duration_ms=max(0, int((now - started).total_seconds() * 1000)),
        http_status=http_status if failure is None else failure.http_status,
        error_code=failure.code if failure else "",
        error_message=failure.message if failure else "",
    )


def step_succeed(*, job, token, data, metrics, http_status=None, writer=LOCKED):
    """Store the step's output and advance (or complete the job)."""
    if not _is_recordable(job, token):
        return RecordOutcome(accepted=False)
    now = timezone.now()
    index, service = job.current_step_index, job.current_service
    job.context[step_key(index, service)] = {
        "status": "SUCCESS",
        "data": data,
        "metrics": metrics,
        "timestamp": now.isoformat(),
    }
    _finish_attempt(job, token, AttemptOutcome.SUCCEEDED, now, http_status=http_status, writer=writer)
    job.last_progress_at = now
    completed = event(
        EventType.STEP_COMPLETED,
        step_index=index,
        message=f"{service} finished in {metrics.get('execution_time_ms', 0)} ms.",
        attempt=job.step_attempt,
        execution_time_ms=metrics.get("execution_time_ms"),
    )
    dispatch = None
    if job.status == JobStatus.CANCELLED:
        job.step_state = StepState.IDLE
        append_events(job, completed, now=now, writer=writer)
    elif index + 1 < job.total_steps:
        job.current_step_index = index + 1
        job.step_attempt = 0
        _next_token(job, now=now)
        append_events(job, completed, now=now, writer=writer)
        dispatch = current_dispatch(job)
    else:
        _set_status(job, JobStatus.COMPLETED)
        job.step_state = StepState.IDLE
        job.finished_at = now
        append_events(
            job,
            completed,
            event(EventType.JOB_COMPLETED, message=f"All {job.total_steps} steps completed."),
            now=now,
            writer=writer,
        )
        writer.after_commit(JOBS_COMPLETED.labels(job.feature_name).inc)
    _save(
        job, "context", "status", "current_step_index", "step_state", "step_token", "step_attempt",
        "step_due_at", "last_progress_at", "finished_at", writer=writer,
    )
    return RecordOutcome(accepted=True, dispatch=dispatch)


def step_fail(*, job, token, failure, retry_delay_s, outcome=AttemptOutcome.FAILED, writer=LOCKED):
    """Record a failed attempt; retry after ``retry_delay_s``, or fail the job when None."""
    if not _is_recordable(job, token):
        return RecordOutcome(accepted=False)
    now = timezone.now()
    index, service = job.current_step_index, job.current_service
    _finish_attempt(job, token, outcome, now, failure=failure, writer=writer)
    dispatch = None
    if job.status == JobStatus.CANCELLED:
        job.step_state = StepState.IDLE
    elif retry_delay_s is not None:
        _next_token(job, now=now, delay_s=retry_delay_s)
        job.last_progress_at = now
        append_events(
            job,
            event(
                EventType.STEP_RETRYING,
                step_index=index,
                message=f"{service} failed ({failure.code}: {failure.message}); "
                f"retrying in {retry_delay_s:.1f} s.",
                attempt=job.step_attempt,
                error_code=failure.code,
                retry_in_ms=int(retry_delay_s * 1000),
            ),
            now=now,
            writer=writer,
        )
        dispatch = current_dispatch(job, delay_s=retry_delay_s)
        writer.after_commit(STEP_RETRIES.labels(service, failure.code).inc)
    else:
        _fail_job(job, failure, now=now, step_index=index, writer=writer)
    _save(
        job, "status", "step_state", "step_token", "step_due_at", "error_code", "error_message",
        "retryable", "finished_at", "last_progress_at", writer=writer,
    )
    return RecordOutcome(accepted=True, dispatch=dispatch)


def _fail_job(job, failure, *, now, step_index=None, writer=LOCKED):
    _set_status(job, JobStatus.FAILED)
    job.step_state = StepState.IDLE
    job.error_code = failure.code
    job.error_message = failure.message
    job.retryable = failure.retryable
    job.finished_at = now
    append_events(
        job,
        event(
            EventType.JOB_ERROR,
            step_index=step_index,
            message=failure.message,
            error_code=failure.code,
            retryable=failure.retryable,
            action=RETRY_AVAILABLE if failure.retryable else CONTACT_SUPPORT,
        ),
        now=now,
        writer=writer,
    )
    # Every way a job fails comes here: retries exhausted, a non-retryable
    # error, its worker lost for good, stuck, its service gone.
    writer.after_commit(JOBS_FAILED.labels(job.feature_name, failure.code).inc)


def step_requeue(*, job, delay_s=0.0):
    """Send the current step again under a fresh token (its message was lost), due after ``delay_s``."""
    _next_token(job, now=timezone.now(), delay_s=delay_s)
    _save(job, "step_state", "step_token", "step_due_at")
    return current_dispatch(job, delay_s=delay_s)


def job_fail(*, job, failure):
    """Fail an active job outside of an attempt (stuck, or its service vanished)."""
    now = timezone.now()
    step_index = job.current_step_index if job.current_service else None
    if job.step_state == StepState.RUNNING:
        _finish_attempt(job, job.step_token, AttemptOutcome.LOST, now, failure=failure)
    # Fence whatever is in flight: a late result of this token is discarded.
    job.step_token += 1
    _fail_job(job, failure, now=now, step_index=step_index)
    _save(job, "status", "step_state", "step_token", "error_code", "error_message", "retryable", "finished_at")
