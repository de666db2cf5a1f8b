"""Where a job's event stream ends: after the event that finished the job.

JOB_COMPLETED and JOB_CANCELLED finish a job for good. JOB_ERROR finishes it
too (the job is FAILED), unless the job was resumed: a JOB_RESUMED right
after it means more events follow. A client whose resume point is at or
after the finishing event has nothing more to wait for
(``jobs.selectors.finishing_seq`` finds it in the log).
A cancelled job's call in flight may still record its STEP_COMPLETED after
JOB_CANCELLED: the event log and the WebSocket have it, the stream has
ended before it.
"""

from jobs.models import EventType, JobStatus

END_EVENTS = frozenset({EventType.JOB_COMPLETED, EventType.JOB_CANCELLED, EventType.JOB_ERROR})
FINISHED_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED})


def ends_stream(event, following=None):
    """Whether ``event`` finishes its job, given the event that follows it in the log (None if none yet)."""
    if event.get("type") not in END_EVENTS:
        return False
    return not (event["type"] == EventType.JOB_ERROR and following and following.get("type") == EventType.JOB_RESUMED)
