"""Where a job's event stream ends: after the event that finished the job.

JOB_COMPLETED and JOB_CANCELLED finish a job for good. JOB_ERROR finishes it
too (the job is FAILED), unless the job was resumed: a JOB_RESUMED right
after it means more events follow. A client whose resume point is at or
after the finishing event has nothing more to wait for (``finishing_seq``).
A cancelled job's call in flight may still record its STEP_COMPLETED after
JOB_CANCELLED: the event log and the WebSocket have it, the stream has
ended before it.
"""

from jobs.models import EventType, JobEvent, JobStatus

END_EVENTS = frozenset({EventType.JOB_COMPLETED, EventType.JOB_CANCELLED, EventType.JOB_ERROR})
FINISHED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED})


def ends_stream(event, following=None):
    """Whether ``event`` finishes its job, given the event that follows it in the log (None if none yet)."""
    if event.get("type") not in END_EVENTS:
        return False
    return not (event["type"] == EventType.JOB_ERROR and following and following.get("type") == EventType.JOB_RESUMED)


def finishing_seq(job):
    """The seq of the event that finished ``job``, or None while it can still emit events.

    Queries the log: async code calls it in Django's database thread.
    """
    if job.status not in FINISHED_STATUSES:
        return None
    seq = (
        JobEvent.objects.filter(job_id=job.pk, type__in=END_EVENTS)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    )
    # A finished job always logged its end; should the row be missing, its last event stands in.
    return job.last_event_seq if seq is None else seq
