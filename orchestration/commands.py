"""What the interfaces (API, admin) do to jobs: submit, resume, cancel.

Each command changes state through ``jobs.services`` in one transaction and
sends what follows (the step message, a freed slot's hand-offs) only once it
has committed.
"""

from django.db import transaction

from api_keys.selectors import lane_policy
from common import metrics
from common.after_commit import after_commit
from jobs import services as job_services
from jobs.errors import ForceNotAllowed, JobNotFound
from jobs.models import ACTIVE_STATUSES, StepState
from jobs.selectors import parse_job_id, visible_jobs
from jobs.state import current_step, tenant_of
from orchestration.admission import admit_quietly
from orchestration.dispatch import send_after_commit
from orchestration.slots import release_step


def _locked_visible_job(job_id, *, owner, is_staff):
    job = visible_jobs(owner, is_staff=is_staff).select_for_update().filter(pk=parse_job_id(job_id)).first()
    if job is None:
        raise JobNotFound()
    return job


def submit_job(
    *, feature_name, input_data, owner=None, idempotency_key=None, deadline_at=None, priority=0, webhook_url=None,
    webhook_events=None,
):
    """Create a job and send its first step; returns ``(job, created)``.

    The job is one INSERT that commits by itself; its first message leaves
    once it has (after the caller's transaction, if there is one). A key
    with a cap on concurrent jobs creates it with the key's row locked, and
    HELD, with no message, when the key runs as many as it may.
    """
    job, created = job_services.job_create(
        feature_name=feature_name, input_data=input_data, owner=owner, idempotency_key=idempotency_key,
        deadline_at=deadline_at, priority=priority, job_cap=_job_cap(owner), webhook_url=webhook_url,
        webhook_events=webhook_events,
    )
    if created and job.step_state != StepState.HELD:
        send_after_commit(current_step(job))
        after_commit(metrics.JOBS_CREATED.labels(feature_name).inc)
    return job, created


def resume_job(*, job_id, owner=None, is_staff=False, force=False):
    """Continue a FAILED job from its current step; returns a ResumeOutcome."""
    if force and not is_staff:
        raise ForceNotAllowed()
    with transaction.atomic():
        job = _locked_visible_job(job_id, owner=owner, is_staff=is_staff)
        outcome = job_services.job_resume(job=job, force=force, job_cap=lane_policy(tenant_of(job)).job_cap)
        if outcome.dispatch:
            send_after_commit(outcome.dispatch)
    return outcome


def cancel_job(*, job_id, owner=None, is_staff=False):
    """Cancel an unfinished job; returns a CancelOutcome."""
    with transaction.atomic():
        job = _locked_visible_job(job_id, owner=owner, is_staff=is_staff)
        outcome = job_services.job_cancel(job=job)
        if outcome.withdrawn:
            after_commit(release_step, outcome.withdrawn)
        if outcome.previous_status in ACTIVE_STATUSES and job.owner_id is not None:
            after_commit(admit_quietly, tenant_of(job))  # its place is free
    return outcome


def _job_cap(owner):
    return lane_policy(str(owner.pk)).job_cap if owner is not None else 0
