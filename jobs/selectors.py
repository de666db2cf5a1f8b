"""Read-only queries over jobs, scoped to what the caller may see."""

import uuid

from jobs import stream_end
from jobs.errors import JobNotFound
from jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, StepAttempt, StepState, step_key


def parse_job_id(raw):
    """The UUID in ``raw``, or JobNotFound: a malformed id is just an unknown job."""
    try:
        return uuid.UUID(str(raw))
    except (TypeError, ValueError):
        raise JobNotFound() from None


def visible_jobs(owner, *, is_staff=False):
    """Jobs the caller may see: staff see all, a client only its own."""
    jobs = Job.objects.all()
    if not is_staff:
        jobs = jobs.filter(owner=owner)
    return jobs


def job_get(job_id, *, owner=None, is_staff=False):
    job = visible_jobs(owner, is_staff=is_staff).filter(pk=parse_job_id(job_id)).first()
    if job is None:
        raise JobNotFound()
    return job


def calls_in_flight(service):
    """(job_id, step_index, step_token) of every step whose call to ``service`` is running.

    A cancelled job's call runs to its end, so those count too.
    """
    running = Job.objects.filter(
        status__in=(JobStatus.RUNNING, JobStatus.CANCELLED), step_state=StepState.RUNNING
    ).values_list("id", "current_step_index", "step_token", "steps")
    return [
        (job_id, index, token)
        for job_id, index, token, steps in running
        if index < len(steps) and steps[index] == service
    ]


def job_list(*, owner=None, is_staff=False, status=None, feature_name=None):
    jobs = visible_jobs(owner, is_staff=is_staff)
    if status:
        jobs = jobs.filter(status=status)
    if feature_name:
        jobs = jobs.filter(feature_name=feature_name)
    return jobs.order_by("-created_at", "-id")


def job_attempts(job):
    return list(job.attempts.order_by("started_at", "id"))


def job_events(job_id, *, after=0, through=None, limit=None):
    """Stored event payloads of a job with ``after < seq <= through``, in seq order."""
    events = JobEvent.objects.filter(job_id=job_id, seq__gt=after)
    if through is not None:
        events = events.filter(seq__lte=through)
    events = events.order_by("seq").values_list("payload", flat=True)
    if limit:
        events = events[:limit]
    return list(events)


def job_events_of_types(job_id, types, *, through):
    """``{"type", "created_at", "payload"}`` of a job's events of ``types`` with ``seq <= through``, in seq order."""
    events = JobEvent.objects.filter(job_id=job_id, seq__lte=through, type__in=types)
    return list(events.order_by("seq").values("type", "created_at", "payload"))


def step_timeline(job, attempts):
    """Each step of ``job`` as the pages and the API show it.

    ``state`` is one of pending, waiting, running, retrying, done, failed,
    cancelled.
    """
    by_step = {}
    for attempt in attempts:
        by_step.setdefault(attempt.step_index, []).append(attempt)
    timeline = []
    for index, service in enumerate(job.steps):
        output = job.context.get(step_key(index, service))
        step_attempts = by_step.get(index, [])
        if output is not None:
            state = "done"
        elif index != job.current_step_index:
            state = "pending"
        elif job.status == JobStatus.FAILED:
            state = "failed"
        elif job.status == JobStatus.CANCELLED:
            state = "running" if job.step_state == StepState.RUNNING else "cancelled"
        elif job.step_state == StepState.RUNNING:
            state = "running"
        elif job.step_state in (StepState.WAITING, StepState.HELD):
            state = "waiting"
        elif job.step_attempt > 0:
            state = "retrying"
        else:
            state = "pending"
        durations = [a.duration_ms for a in step_attempts if a.duration_ms is not None]
        timeline.append(
            {
                "index": index,
                "service": service,
                "state": state,
                "attempts": len(step_attempts),
                "duration_ms": durations[-1] if state == "done" and durations else None,
                "output": output,
                "attempt_history": step_attempts,
            }
        )
    return timeline


def attempt_running(job_id, *, token, started_at):
    """Whether the attempt that started at ``started_at`` under ``token`` is still the job's running one."""
    return Job.objects.filter(
        pk=job_id,
        step_token=token,
        step_state=StepState.RUNNING,
        attempts__token=token,
        attempts__started_at=started_at,
        attempts__outcome=AttemptOutcome.RUNNING,
    ).exists()


def attempt_recorded(job_id, *, token):
    """Whether the attempt run under ``token`` has its result (success or failure) stored."""
    return (
        StepAttempt.objects.filter(job_id=job_id, token=token)
        .exclude(outcome__in=(AttemptOutcome.RUNNING, AttemptOutcome.LOST))
        .exists()
    )


def finishing_seq(job):
    """The seq of the event that finished ``job``, or None while it can still emit events.

    Queries the log: async code calls it in Django's database thread.
    """
    if job.status not in stream_end.FINISHED_STATUSES:
        return None
    seq = (
        JobEvent.objects.filter(job_id=job.pk, type__in=stream_end.END_EVENTS)
        .order_by("-seq")
        .values_list("seq", flat=True)
        .first()
    )
    # A finished job always logged its end; should the row be missing, its last event stands in.
    return job.last_event_seq if seq is None else seq
