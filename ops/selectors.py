"""Cross-app reads for the ops console: job counts, the recipe list's, the live overview's figures."""

from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

from django.db.models import Aggregate, Count, FloatField, IntegerField, OuterRef, Q, Subquery, Value
from django.db.models.functions import Coalesce, TruncMinute

from jobs.models import ACTIVE_STATUSES, JOB_END_EVENTS, AttemptOutcome, EventType, Job, JobEvent, JobStatus, StepAttempt


def job_counts_by_status(*, since):
    """``{status: count}`` of jobs created at or after ``since``, every status present (zeros too)."""
    counts = dict(
        Job.objects.filter(created_at__gte=since)
        .order_by()
        .values_list("status")
        .annotate(count=Count("id"))
    )
    return {status: counts.get(status, 0) for status in JobStatus.values}


def with_active_job_count(recipes):
    """``recipes`` annotated with ``active_job_count``: their PENDING and RUNNING jobs."""
    active = (
        Job.objects.filter(feature_name=OuterRef("name"), status__in=ACTIVE_STATUSES)
        .order_by()
        .values("feature_name")
        .annotate(count=Count("id"))
        .values("count")
    )
    return recipes.annotate(
        active_job_count=Coalesce(Subquery(active, output_field=IntegerField()), Value(0))
    )


class Percentile(Aggregate):
    """PostgreSQL's ``percentile_cont``: the ``fraction`` percentile, interpolated; NULLs are ignored."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()

    def __init__(self, expression, *, fraction, **extra):
        if not 0 <= fraction <= 1:
            raise ValueError(f"A percentile's fraction is between 0 and 1, got {fraction!r}")
        super().__init__(expression, fraction=float(fraction), **extra)


FAILED_OUTCOMES = (AttemptOutcome.FAILED, AttemptOutcome.LOST)


@dataclass(frozen=True)
class CallFigures:
    """One service's calls that ended in a window."""

    calls: int = 0
    failures: int = 0
    p95_ms: float | None = None  # None: no call ended in the window


def call_figures_by_service(*, since):
    """``{service name: CallFigures}`` of the attempts that ended at or after ``since``.

    One aggregate query, a range of ``attempt_finished_idx``; a service with
    no call in the window is absent.
    """
    rows = (
        StepAttempt.objects.filter(finished_at__gte=since)
        .order_by()
        .values("service")
        .annotate(
            calls=Count("*"),
            failures=Count("outcome", filter=Q(outcome__in=FAILED_OUTCOMES)),
            p95_ms=Percentile("duration_ms", fraction=0.95),
        )
    )
    return {row["service"]: CallFigures(row["calls"], row["failures"], row["p95_ms"]) for row in rows}


@dataclass(frozen=True)
class JobMinute:
    """One minute of jobs: created in it, and runs that ended in it (completed, failed)."""

    minute: datetime
    created: int = 0
    completed: int = 0
    failed: int = 0


def jobs_per_minute(*, now, minutes):
    """The last ``minutes`` whole minutes up to ``now``'s (which is still running), oldest first.

    A failure counts when it happens (its JOB_ERROR), also for a job resumed
    since; cancellations are neither. Two queries: jobs by ``job_recent_idx``,
    end events by ``job_event_end_idx``.
    """
    current = now.astimezone(dt_timezone.utc).replace(second=0, microsecond=0)
    first = current - timedelta(minutes=minutes - 1)
    created = dict(
        Job.objects.filter(created_at__gte=first)
        .annotate(minute=TruncMinute("created_at", tzinfo=dt_timezone.utc))
        .order_by()
        .values_list("minute")
        .annotate(count=Count("*"))
    )
    ended = {
        row["minute"]: row
        for row in JobEvent.objects.filter(type__in=JOB_END_EVENTS, created_at__gte=first)
        .annotate(minute=TruncMinute("created_at", tzinfo=dt_timezone.utc))
        .order_by()
        .values("minute")
        .annotate(
            completed=Count("type", filter=Q(type=EventType.JOB_COMPLETED)),
            failed=Count("type", filter=Q(type=EventType.JOB_ERROR)),
        )
    }
    result = []
    for offset in range(minutes):
        minute = first + timedelta(minutes=offset)
        row = ended.get(minute, {})
        result.append(JobMinute(minute, created.get(minute, 0), row.get("completed", 0), row.get("failed", 0)))
    return result
