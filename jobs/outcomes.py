"""What the state changes of ``jobs.services`` and ``jobs.steps`` return.

A ``StepDispatch`` is the step message to send after commit (the caller
sends it); the outcomes say what a resume, a cancel or a recorded attempt
led to.
"""

from dataclasses import dataclass

from jobs.models import Job


@dataclass(frozen=True)
class StepDispatch:
    """A step of a job under a given token (what its message carries and its lease is named after).

    As a message to send once the transaction commits, it is due after ``delay_s``.
    """

    job_id: object
    step_index: int
    token: int
    service: str
    delay_s: float = 0.0
    # Where it stands in its service's line: its job's owner (the API key's
    # id, "" for none) and priority.
    tenant: str = ""
    priority: int = 0


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
    # None when the job resumed HELD, waiting for one of its key's places.
    dispatch: StepDispatch | None


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    previous_status: str
    # The parked or queued step to withdraw from its service's waiting line.
    withdrawn: StepDispatch | None


@dataclass(frozen=True)
class RecordOutcome:
    """What recording an attempt's result led to."""

    accepted: bool
    dispatch: StepDispatch | None = None
    # The job is no longer active (COMPLETED or FAILED): its key's place is free.
    ended: bool = False
