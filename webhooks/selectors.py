"""Reads of the webhook outbox: what maintenance, /metrics and the staff job page need."""

from django.db.models import Count, Min, OuterRef, Q, Subquery

from webhooks.models import Delivery, DeliveryAttempt, DeliveryState


def jobs_with_due_deliveries(*, due_before, now, limit=1000):
    """``(job_id, lease_lapsed)`` of jobs with a pending delivery that is due and not held.

    Due since before ``due_before`` when never claimed; due at all when its
    attempt's lease lapsed (``lease_lapsed``: a worker claimed it and never
    recorded it, having died mid-POST).
    """
    lapsed = Q(lease_until__isnull=False, lease_until__lte=now)
    rows = (
        Delivery.objects.filter(state=DeliveryState.PENDING, next_attempt_at__lte=now)
        .filter(lapsed | Q(lease_until__isnull=True, next_attempt_at__lte=due_before))
        .values("job_id")
        .annotate(lapsed=Count("pk", filter=lapsed))
        .order_by("job_id")[:limit]
    )
    return [(row["job_id"], row["lapsed"] > 0) for row in rows]


def pending_summary():
    """``(count, oldest created_at or None)`` of the deliveries still to be made."""
    row = Delivery.objects.filter(state=DeliveryState.PENDING).aggregate(count=Count("pk"), oldest=Min("created_at"))
    return row["count"], row["oldest"]


def job_deliveries(job_id):
    """A job's deliveries in event order, each with ``last_latency_ms``: how long its latest attempt took.

    One query, however many deliveries and attempts the job has.
    """
    latest = DeliveryAttempt.objects.filter(delivery=OuterRef("pk")).order_by("-number").values("latency_ms")[:1]
    return list(Delivery.objects.filter(job_id=job_id).annotate(last_latency_ms=Subquery(latest)).order_by("seq"))
