"""One job row: read or lock it, move its status, queue its step under a fresh token, save it.

The primitives ``jobs.services`` (client operations) and ``jobs.steps``
(the step lifecycle) build their state changes from.
"""

from datetime import timedelta

from jobs import errors
from jobs.job_rows import fetch_job
from jobs.models import TRANSITIONS, Job, JobStatus, StepState
from jobs.outcomes import StepDispatch
from jobs.writes import LOCKED


# Written out, the statements skip the ORM's query compiler, which was a
# quarter of a worker's CPU per step when every step locked the job twice.
LOCK_JOB_SQL = f"SELECT * FROM {Job._meta.db_table} WHERE id = %s FOR UPDATE"
READ_JOB_SQL = f"SELECT * FROM {Job._meta.db_table} WHERE id = %s"


def lock_job(job_id):
    """The job with its row locked until the transaction ends, or None."""
    return fetch_job(LOCK_JOB_SQL, [str(job_id)])


def read_job(job_id):
    """The job as it is now, without a lock (for a conditional write), or None."""
    return fetch_job(READ_JOB_SQL, [str(job_id)])


def current_step(job, delay_s=0.0):
    """The job's current step under its current token (its message, due after ``delay_s``)."""
    return StepDispatch(
        job.id, job.current_step_index, job.step_token, job.current_service, delay_s,
        tenant=tenant_of(job), priority=job.priority,
    )


def tenant_of(job):
    """Whose share of a service's turns a job's steps take: its owner's (an API key id), or ""."""
    return str(job.owner_id) if job.owner_id is not None else ""


def set_status(job, status):
    if status not in TRANSITIONS[JobStatus(job.status)]:
        raise errors.IllegalTransition(f"A {job.status} job cannot become {status}.")
    job.status = status


def save(job, *fields, writer=LOCKED):
    """Write ``fields`` of ``job`` (with its event seq and updated_at) through ``writer``."""
    writer.save(job, fields)


def next_token(job, *, now, delay_s=0.0):
    """Queue the current step under a fresh token, due after ``delay_s``."""
    job.step_state = StepState.QUEUED
    job.step_token += 1
    job.step_due_at = now + timedelta(seconds=delay_s)
