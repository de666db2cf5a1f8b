"""Mutation testing of jobs.models.TRANSITIONS, which mutmut cannot reach.

mutmut mutates code inside functions only, and the transition table is
module-level data. This runner makes every single-edge mutant of the table
(each allowed move removed, each forbidden move added: one per pair of
statuses), flips it in place (jobs.state holds the same dict) and runs
the fast tests that decide moves against it, in this process; a mutant is
killed when they fail. ``make mutate`` runs it after mutmut::

    python -m tests.mutate_transitions        # a line per survivor, then the score
"""

import contextlib
import io
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ["tests/test_job_transitions.py"]
STATUSES = ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLED"]


def run_tests():
    """pytest's exit code for TESTS, its output kept quiet."""
    with contextlib.redirect_stdout(io.StringIO()) as output:
        code = pytest.main([*TESTS, "-q", "-x", "-p", "no:cacheprovider"])
    return code, output.getvalue()


def run_mutant(current, target):
    """True when the tests fail against the table with (current -> target) flipped: the mutant is killed."""
    from jobs.models import TRANSITIONS, JobStatus

    moves = TRANSITIONS[JobStatus(current)]
    moves ^= {JobStatus(target)}
    try:
        code, output = run_tests()
    finally:
        moves ^= {JobStatus(target)}
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise RuntimeError(f"pytest could not run the mutant {current}>{target}:\n{output}")
    return code == pytest.ExitCode.TESTS_FAILED


def main():
    os.chdir(ROOT)
    code, output = run_tests()
    if code != pytest.ExitCode.OK:
        print(output)
        return "the tests fail on the unmutated table"
    edges = [(current, target) for current in STATUSES for target in STATUSES]
    survivors = [f"{current}>{target}" for current, target in edges if not run_mutant(current, target)]
    for edge in survivors:
        print(f"survived: TRANSITIONS with {edge} flipped")
    print(f"jobs.models.TRANSITIONS: {len(edges) - len(survivors)}/{len(edges)} single-edge mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
