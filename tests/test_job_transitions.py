"""jobs.models.TRANSITIONS: every (from, to) pair of job statuses, allowed or IllegalTransition."""

import pytest

from jobs.errors import IllegalTransition
from jobs.models import TRANSITIONS, Job, JobStatus
from jobs.state import set_status

P, R, C, F, X = "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"

# One row per (from, to), the expected outcome beside it: the state diagram of docs/ARCHITECTURE.md.
TABLE = [
    (P, P, "illegal"),
    (P, R, "allowed"),  # the first step is claimed
    (P, C, "illegal"),  # nothing ran
    (P, F, "allowed"),  # the first step's service vanished before it started
    (P, X, "allowed"),  # cancelled while queued
    (R, P, "illegal"),  # a job never goes back to pending
    (R, R, "allowed"),  # each later step is claimed while running
    (R, C, "allowed"),  # the last step was recorded
    (R, F, "allowed"),  # retries exhausted, a permanent error, stuck
    (R, X, "allowed"),  # cancelled mid-recipe
    (F, P, "illegal"),
    (F, R, "allowed"),  # resume
    (F, C, "illegal"),  # only a running step can complete a job
    (F, F, "illegal"),  # failing twice would write a second JOB_ERROR
    (F, X, "allowed"),  # an operator gives up on it
    (C, P, "illegal"),
    (C, R, "illegal"),  # a completed job is never resumed
    (C, C, "illegal"),
    (C, F, "illegal"),
    (C, X, "illegal"),
    (X, P, "illegal"),
    (X, R, "illegal"),  # a cancelled job is never resumed
    (X, C, "illegal"),  # its last call is recorded, but the job stays cancelled
    (X, F, "illegal"),
    (X, X, "illegal"),  # a second cancel is a conflict, not a second JOB_CANCELLED
]


def test_the_table_covers_every_pair_of_statuses():
    assert sorted((a, b) for a, b, _ in TABLE) == sorted((a, b) for a in JobStatus.values for b in JobStatus.values)
    assert set(TRANSITIONS) == set(JobStatus)


@pytest.mark.parametrize("current, target, expected", TABLE)
def test_a_status_change(current, target, expected):
    job = Job(status=current)

    if expected == "allowed":
        set_status(job, JobStatus(target))
        assert job.status == target
    else:
        with pytest.raises(IllegalTransition) as raised:
            set_status(job, JobStatus(target))
        assert str(raised.value) == f"A {current} job cannot become {target}."
        assert job.status == current


def test_terminal_statuses_have_no_way_out():
    assert TRANSITIONS[JobStatus.COMPLETED] == set() and TRANSITIONS[JobStatus.CANCELLED] == set()
