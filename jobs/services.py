"""Client operations on jobs: create (with its input checks), resume, cancel.

Functions taking a ``job`` expect it locked (``lock_job`` inside
``transaction.atomic()``): the row lock serialises racing actors and makes
event seq numbers gapless. They never send messages; they return the step
message to send (``StepDispatch``) and the caller sends it after commit.
The step lifecycle the engine drives is ``jobs.steps``.
"""

import json
import re
from contextlib import nullcontext

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from common.errors import InvalidInput
from common.json_values import unstorable_reason
from jobs import admission, errors
from jobs.events import append_events, event
from jobs.models import DEFAULT_PRIORITY, TERMINAL_STATUSES, EventType, Job, JobStatus, StepState
from jobs.outcomes import CancelOutcome, ResumeOutcome
from jobs.state import current_step, next_token, save, set_status
from services_registry.selectors import recipe_snapshot
from webhooks.outbox import checked_webhook


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


def job_create(
    *, feature_name, input_data, owner=None, idempotency_key=None, deadline_at=None, priority=DEFAULT_PRIORITY,
    job_cap=0, webhook_url=None, webhook_events=None,
):
    """Create a PENDING job for ``feature_name``; returns ``(job, created)``.

    With an ``idempotency_key`` already used by the same owner, returns that
    job (``created`` False) instead of creating another one. ``deadline_at``:
    when the job must be done by (``orchestration`` enforces it).
    ``priority``: its place within its owner's share of each busy service.
    ``job_cap``: the owner's ``max_concurrent_jobs``; when that many of its
    jobs run, the new one is HELD (``jobs.admission``) and has no step to send.
    ``webhook_url``: where its events (``webhook_events``, by default how it
    ends) are POSTed, signed with the owner's secret (``webhooks``).
    """
    check_input_data(input_data)
    webhook_url, webhook_events = checked_webhook(url=webhook_url, events=webhook_events, owner=owner)
    if idempotency_key:
        existing = _job_for_idempotency_key(owner, idempotency_key, feature_name, input_data)
        if existing:
            return existing, False
    now = timezone.now()
    fields = dict(
        feature_name=feature_name,
        steps=_runnable_steps(feature_name),
        owner=owner,
        idempotency_key=idempotency_key or None,
        context={"initial_input": input_data},
        step_due_at=now,
        last_progress_at=now,
        deadline_at=deadline_at,
        priority=priority,
        webhook_url=webhook_url,
        webhook_events=webhook_events or None,
    )
    if not job_cap or owner is None:
        return _insert_job(fields, input_data)
    with transaction.atomic():
        admission.lock_key(owner.pk)
        room = admission.has_room(owner.pk, job_cap)
        job, created = _insert_job(fields, input_data)
        if created and not room:
            admission.hold(job, cap=job_cap, now=now)
    return job, created


def _insert_job(fields, input_data):
    try:
        with _alone_or_in_a_savepoint():
            return Job.objects.create(**fields), True
    except IntegrityError:
        # A concurrent request with the same key won the insert.
        existing = _job_for_idempotency_key(
            fields["owner"], fields["idempotency_key"], fields["feature_name"], input_data
        )
        if existing is None:
            raise
        return existing, False


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


def job_resume(*, job, force=False, job_cap=0):
    """FAILED -> RUNNING from the current step, with a fresh attempt budget.

    ``job_cap``: the owner's ``max_concurrent_jobs``; when that many of its
    jobs run, the job resumes HELD (``jobs.admission``), with no step to send.
    """
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
    # Counted before the job itself becomes active again.
    held = bool(job_cap) and job.owner_id is not None and not _room_after_lock(job.owner_id, job_cap)
    now = timezone.now()
    previous_status = job.status
    forced = bool(force and not job.retryable)
    set_status(job, JobStatus.RUNNING)
    next_token(job, now=now)
    job.step_attempt = 0
    job.error_code, job.error_message, job.retryable = "", "", False
    job.finished_at = None
    job.last_progress_at = now
    # Resuming asks for the work to be done: a deadline already passed would fail it at once.
    lifted_deadline = job.deadline_at is not None and job.deadline_at <= now
    if lifted_deadline:
        job.deadline_at = None
    append_events(
        job,
        event(
            EventType.JOB_RESUMED,
            step_index=job.current_step_index,
            message=f"Resumed from step {job.current_step_index + 1} of {job.total_steps}.",
            previous_status=previous_status,
            forced=forced,
            **({"deadline_lifted": True} if lifted_deadline else {}),
        ),
        now=now,
    )
    save(
        job, "status", "step_state", "step_token", "step_due_at", "step_attempt", "error_code",
        "error_message", "retryable", "finished_at", "last_progress_at", "deadline_at",
    )
    if held:
        admission.hold(job, cap=job_cap, now=now)
        return ResumeOutcome(job, previous_status, None)
    return ResumeOutcome(job, previous_status, current_step(job))


def _room_after_lock(owner_id, cap):
    admission.lock_key(owner_id)
    return admission.has_room(owner_id, cap)


def job_cancel(*, job):
    """Stop the job: no further step starts. A call in flight finishes and is recorded."""
    if job.status in TERMINAL_STATUSES:
        raise errors.JobNotCancellable(f"The job is already {job.status}.", details={"status": job.status})
    now = timezone.now()
    previous_status = job.status
    withdrawn = None
    if job.step_state in (StepState.QUEUED, StepState.WAITING):
        withdrawn = current_step(job)
    set_status(job, JobStatus.CANCELLED)
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
    save(job, "status", "step_state", "finished_at")
    return CancelOutcome(job, previous_status, withdrawn)
