"""Reads of the webhook outbox: what maintenance and /metrics need."""

from django.db.models import Count, Min, Q

from webhooks.models import Delivery, DeliveryState


def jobs_with_due_deliveries(*, due_before, now, limit=1000):
    """``(job_id, lease_lapsed)`` of jobs whose head delivery is due since before ``due_before`` and not held.

    ``lease_lapsed``: an attempt was claimed and its worker never recorded it (it died mid-POST).
    """
    rows = (
        Delivery.objects.filter(state=DeliveryState.PENDING, next_attempt_at__lte=due_before)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .values("job_id")
        .annotate(lapsed=Count("pk", filter=Q(lease_until__isnull=False)))
        .order_by("job_id")[:limit]
    )
    return [(row["job_id"], row["lapsed"] > 0) for row in rows]


def pending_summary():
    """``(count, oldest created_at or None)`` of the deliveries still to be made."""
    row = Delivery.objects.filter(state=DeliveryState.PENDING).aggregate(count=Count("pk"), oldest=Min("created_at"))
    return row["count"], row["oldest"]
