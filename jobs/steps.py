"""The step lifecycle the engine drives: claim, park, record a success or a failure, requeue, fail.

Each function takes the job (locked, or read for a conditional write) and
a ``writer`` (``jobs.writes``): with ``ConditionalWrite`` the whole
transition is written in one statement only if the row has not moved since
it was read. They never send messages; they return the step message to
send (``StepDispatch``) and the caller sends it after commit.
"""

from django.utils import timezone

from common.metrics import JOBS_COMPLETED, JOBS_FAILED, STEP_RETRIES
from jobs.events import CONTACT_SUPPORT, RETRY_AVAILABLE, append_events, event, event_payload
from jobs.models import ACTIVE_STATUSES, AttemptOutcome, EventType, JobStatus, StepAttempt, StepState, step_key
from jobs.outcomes import RecordOutcome
from jobs.state import current_step, next_token, save, set_status
from jobs.writes import ATTEMPT_PLACEHOLDER, LOCKED, UnreadClaim


def step_is_current(job, *, step_index, token):
    """Whether a message for (step_index, token) may act on the locked job."""
    return (
        job.status in (JobStatus.PENDING, JobStatus.RUNNING)
        and job.current_step_index == step_index
        and job.step_token == token
        and job.step_state in (StepState.QUEUED, StepState.WAITING)
    )


def step_park(
    *, job, position=None, cooling_until=None, circuit_open=False, rate_limited_until=None,
    rate_limit=None, tenant_capped=False, writer=LOCKED,
):
    """No free slot: the step waits in its service's line, holding no thread.

    What holds it back: ``cooling_until`` (a datetime), the service cools
    down until then (it answered 429/503 with Retry-After); ``circuit_open``,
    its circuit breaker opened after repeated failures; ``rate_limited_until``
    (a datetime), its ``rate_limit`` budget ("tokens_per_minute", or by
    default "requests_per_minute") is spent until then; ``tenant_capped``, its job's
    API key is in as many calls to the service as its cap allows; else every
    slot is taken.
    """
    first_time = job.step_state == StepState.QUEUED
    job.step_state = StepState.WAITING
    if first_time:
        if cooling_until is not None:
            held_by = {
                "message": f"Waiting for {job.current_service} to cool down (it asked to retry after "
                f"{cooling_until.isoformat()}).",
                "limit": "cool_down",
                "cooling_until": cooling_until.isoformat(),
            }
        elif circuit_open:
            held_by = {
                "message": f"Waiting: the circuit of {job.current_service} is open after repeated failures; "
                "a probe call goes first.",
                "limit": "circuit_open",
            }
        elif rate_limited_until is not None:
            rate_limit = rate_limit or "requests_per_minute"
            spent = "calls" if rate_limit == "requests_per_minute" else "tokens"
            held_by = {
                "message": f"Waiting: {job.current_service} has used as many {spent} this minute as it may.",
                "limit": rate_limit,
                "until": rate_limited_until.isoformat(),
            }
        elif tenant_capped:
            held_by = {
                "message": f"Waiting: this API key's jobs are in as many calls to {job.current_service} as it "
                "allows at once.",
                "limit": "key_concurrency",
            }
        else:
            held_by = {"message": f"Waiting for a free slot of {job.current_service}.", "limit": "concurrency"}
        append_events(
            job,
            event(EventType.WAITING_FOR_SLOT, step_index=job.current_step_index, position=position, **held_by),
            writer=writer,
        )
    save(job, "step_state", writer=writer)


def _started(step_index, service, attempt, max_attempts):
    return event(
        EventType.STEP_STARTED,
        step_index=step_index,
        message=f"Calling {service} (attempt {attempt} of {max_attempts}).",
        attempt=attempt,
        max_attempts=max_attempts,
    )


def step_claim_unread(step, *, max_attempts):
    """``step_claim`` for a job that was not read: the one statement that starts the attempt.

    For a step message that names its service, once its slot is taken. The
    statement applies only if ``step`` (a ``StepDispatch``) is the job's
    current step, queued or waiting under its token; it is the same
    transition as ``step_claim``, with the attempt number and the event seq
    computed from the row. Run ``execute()`` on the result: the job as the
    claim left it, or None when the step is not claimable (read the job,
    then decide as usual).
    """
    now = timezone.now()
    # The attempt number is known only to the row: the statement writes it
    # into the placeholders (ATTEMPT_PLACEHOLDER, seq and total_steps).
    started = event_payload(
        _started(step.step_index, step.service, ATTEMPT_PLACEHOLDER, max_attempts),
        job_id=step.job_id, seq=0, now=now, total_steps=0, steps={step.step_index: step.service},
    )
    return UnreadClaim(step, now=now, started_event=started)


def step_claim(*, job, max_attempts, writer=LOCKED):
    """Slot granted: the attempt starts. Returns the new StepAttempt."""
    now = timezone.now()
    set_status(job, JobStatus.RUNNING)
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
        job, _started(job.current_step_index, job.current_service, job.step_attempt, max_attempts), now=now, writer=writer
    )
    save(job, "status", "step_state", "step_attempt", "step_started_at", "last_progress_at", writer=writer)
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
        next_token(job, now=now)
        append_events(job, completed, now=now, writer=writer)
        dispatch = current_step(job)
    else:
        set_status(job, JobStatus.COMPLETED)
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
    save(
        job, "context", "status", "current_step_index", "step_state", "step_token", "step_attempt",
        "step_due_at", "last_progress_at", "finished_at", writer=writer,
    )
    return RecordOutcome(accepted=True, dispatch=dispatch, ended=job.status not in ACTIVE_STATUSES)


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
        next_token(job, now=now, delay_s=retry_delay_s)
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
        dispatch = current_step(job, delay_s=retry_delay_s)
        writer.after_commit(STEP_RETRIES.labels(service, failure.code).inc)
    else:
        _fail_job(job, failure, now=now, step_index=index, writer=writer)
    save(
        job, "status", "step_state", "step_token", "step_due_at", "error_code", "error_message",
        "retryable", "finished_at", "last_progress_at", writer=writer,
    )
    return RecordOutcome(accepted=True, dispatch=dispatch, ended=job.status not in ACTIVE_STATUSES)


def _fail_job(job, failure, *, now, step_index=None, writer=LOCKED):
    set_status(job, JobStatus.FAILED)
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
    next_token(job, now=timezone.now(), delay_s=delay_s)
    save(job, "step_state", "step_token", "step_due_at")
    return current_step(job, delay_s=delay_s)


def past_deadline(job, now):
    """Whether ``job`` has a deadline and ``now`` is past it."""
    return job.deadline_at is not None and now >= job.deadline_at


def job_fail(*, job, failure):
    """Fail an active job outside of an attempt (stuck, or its service vanished)."""
    now = timezone.now()
    step_index = job.current_step_index if job.current_service else None
    if job.step_state == StepState.RUNNING:
        _finish_attempt(job, job.step_token, AttemptOutcome.LOST, now, failure=failure)
    # Fence whatever is in flight: a late result of this token is discarded.
    job.step_token += 1
    _fail_job(job, failure, now=now, step_index=step_index)
    save(job, "status", "step_state", "step_token", "error_code", "error_message", "retryable", "finished_at")
