"""What ops can do to a job from the admin, each through the same call the API makes."""

from dataclasses import dataclass
from typing import Callable

from jobs.models import JobStatus
from orchestration import commands


@dataclass(frozen=True)
class JobOperation:
    """One job action: its button label, its verb in messages, and how it runs and is logged."""

    name: str
    label: str
    past: str  # "resumed": "Job … was not resumed: <why>."
    run: Callable  # job_id -> outcome; raises GatewayError when refused
    describe: Callable  # outcome -> the admin log line


def _resume(force):
    return lambda job_id: commands.resume_job(job_id=job_id, is_staff=True, force=force)


def _describe_resume(verb):
    def describe(outcome):
        step = outcome.job.current_step_index + 1
        held = ", held until its API key has a free place" if outcome.dispatch is None else ""
        return f"{verb} from step {step} of {outcome.job.total_steps} (was {outcome.previous_status}){held}."

    return describe


RESUME = JobOperation(
    name="resume",
    label="Resume",
    past="resumed",
    run=_resume(force=False),
    describe=_describe_resume("Resumed"),
)
FORCE_RESUME = JobOperation(
    name="force-resume",
    label="Force resume",
    past="force-resumed",
    run=_resume(force=True),
    describe=_describe_resume("Force-resumed"),
)
CANCEL = JobOperation(
    name="cancel",
    label="Cancel",
    past="cancelled",
    run=lambda job_id: commands.cancel_job(job_id=job_id, is_staff=True),
    describe=lambda outcome: f"Cancelled (was {outcome.previous_status}).",
)

OPERATIONS = {operation.name: operation for operation in (RESUME, FORCE_RESUME, CANCEL)}


def operations_for(job):
    """The operations worth offering for ``job`` (the services still decide)."""
    if job.status == JobStatus.FAILED:
        resumes = [RESUME] if job.retryable else [RESUME, FORCE_RESUME]
        return [*resumes, CANCEL]
    if job.is_terminal:
        return []
    return [CANCEL]
