"""Cross-app reads for the ops console: job counts for the dashboard and the recipe list."""

from django.db.models import Count, IntegerField, OuterRef, Subquery, Value
from django.db.models.functions import Coalesce

from jobs.models import ACTIVE_STATUSES, Job, JobStatus


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
