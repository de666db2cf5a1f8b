"""A key's cap on concurrent jobs: which of its jobs run, and which wait their turn (HELD).

An API key with ``max_concurrent_jobs`` runs at most that many jobs at once:
a job of that key that is active (PENDING or RUNNING) and not HELD holds one
of its places. A job created or resumed when every place is taken is HELD:
no step message, no place in any service's line, a WAITING_FOR_SLOT event
(``limit: key_jobs``). Places are counted and given out only with the key's
row locked (``SELECT ... FOR UPDATE``), so two admitters never both see the
last place free; a job that ends frees its place without the lock (a count
that only falls cannot let too many in), and whoever notices admits the
next (``orchestration.admission``).

The key's row lock is always taken before any job lock it waits for:
``admit_held`` skips held jobs that someone else has locked instead of
waiting, so no cycle can form with a resume (job, then key).

The next job in is the one with the highest priority aged by its wait, as
in a service's line: ``priority + held_seconds / CAO_PRIORITY_AGING_S``.
"""

from django.conf import settings
from django.db.models.expressions import RawSQL
from django.utils import timezone

from api_keys.models import ApiKey
from jobs.events import append_events, event
from jobs.models import ACTIVE_STATUSES, EventType, Job, StepState
from jobs.state import current_step, next_token, save

def lock_key(owner_id):
    """Lock the key's row until the transaction ends (the one lock places are given out under)."""
    ApiKey.objects.select_for_update().filter(pk=owner_id).values_list("pk", flat=True).first()


def running_jobs(owner_id):
    """How many of the key's jobs hold a place: active and not HELD."""
    return Job.objects.filter(owner_id=owner_id, status__in=ACTIVE_STATUSES).exclude(step_state=StepState.HELD).count()


def held_jobs(owner_id=None):
    """The jobs held for a place among their key's running ones (``owner_id``'s, or every key's)."""
    held = Job.objects.filter(status__in=ACTIVE_STATUSES, step_state=StepState.HELD)
    return held if owner_id is None else held.filter(owner_id=owner_id)


def has_room(owner_id, cap):
    """Whether a job of the key may run now; call with the key locked (``lock_key``)."""
    return running_jobs(owner_id) < cap


def hold(job, *, cap, now=None):
    """The job waits for one of its key's ``cap`` places: HELD, with its WAITING_FOR_SLOT event.

    Its wait counts from ``step_due_at`` (now), which orders the held jobs.
    """
    now = now or timezone.now()
    ahead = held_jobs(job.owner_id).exclude(pk=job.pk).count()
    job.step_state = StepState.HELD
    job.step_due_at = now
    append_events(
        job,
        event(
            EventType.WAITING_FOR_SLOT,
            step_index=job.current_step_index,
            message=f"Waiting: this API key runs at most {cap} job{'s' if cap != 1 else ''} at once; "
            "this one starts when one of them ends.",
            position=ahead + 1,
            limit="key_jobs",
        ),
        now=now,
    )
    save(job, "step_state", "step_due_at")


def admit_held(owner_id, cap):
    """Let the key's held jobs in while it has places; returns their step messages (send them after commit).

    Locks the key's row (inside the caller's transaction).
    """
    lock_key(owner_id)
    room = cap - running_jobs(owner_id)
    if room <= 0:
        return []
    now = timezone.now()
    aging_s = max(float(settings.CAO_PRIORITY_AGING_S), 1e-3)
    turn = RawSQL("priority + EXTRACT(EPOCH FROM (%s - step_due_at)) / %s", (now, aging_s))
    admitted = []
    candidates = (
        held_jobs(owner_id)
        .annotate(turn=turn)
        .order_by("-turn", "created_at")
        .select_for_update(skip_locked=True, of=("self",))[:room]
    )
    for job in candidates:
        next_token(job, now=now)
        job.last_progress_at = now  # the wait for a place is over; the stuck clock starts again
        save(job, "step_state", "step_token", "step_due_at", "last_progress_at")
        admitted.append(current_step(job))
    return admitted


def owners_with_held_jobs():
    """The ids of the keys that have held jobs (for maintenance's pass)."""
    return list(held_jobs().values_list("owner_id", flat=True).distinct())
