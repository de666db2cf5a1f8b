"""Letting a capped key's held jobs in as its running ones end (``jobs.admission`` keeps the count).

Whoever sees a job of a capped key end admits the next: the engine after a
step's record completes or fails the job, the cancel command, the claim that
fails a job at its deadline. Maintenance's pass admits for every key that has
held jobs, which covers a crash between the end and the admission, a cap
raised in the admin, and the jobs that maintenance itself fails.
"""

import logging

from django.db import transaction

from api_keys.selectors import lane_policy
from jobs import admission as job_admission
from orchestration.dispatch import send_after_commit

logger = logging.getLogger(__name__)


def admit_held_jobs(tenant):
    """Admit the key's held jobs while it has places; returns how many. A key without a cap: nothing to do."""
    cap = lane_policy(tenant).job_cap
    if not cap:
        return 0
    with transaction.atomic():
        admitted = job_admission.admit_held(int(tenant), cap)
        for dispatch in admitted:
            send_after_commit(dispatch)
    if admitted:
        logger.info("Admitted %d held job(s) of API key %s (%d at once).", len(admitted), tenant, cap)
    return len(admitted)


def admit_quietly(tenant):
    """``admit_held_jobs`` where a failure must not hide the outcome it follows: maintenance admits later."""
    try:
        return admit_held_jobs(tenant)
    except Exception:
        logger.warning("Could not admit the held jobs of API key %s; maintenance will.", tenant, exc_info=True)
        return 0


def admit_everywhere():
    """Maintenance's pass: admit for every key with held jobs; returns how many were admitted."""
    return sum(admit_quietly(str(owner_id)) for owner_id in job_admission.owners_with_held_jobs())
