"""Changes to the webhook outbox from outside a delivery: an operator's redeliver, maintenance's re-send."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from common.after_commit import after_commit
from webhooks import dispatch, selectors
from webhooks.models import Delivery, DeliveryState

logger = logging.getLogger(__name__)


def deliveries_redeliver(*, delivery_ids, now=None):
    """Send these deliveries again, whatever became of them: pending, due now, with a fresh retry window.

    Their attempts so far stay in the log; the next one keeps the same
    ``webhook-id``, so a receiver that already has the event can tell. A
    delivery with an attempt in flight keeps its lease: that attempt
    records its outcome, and no second one starts beside it.
    Returns how many were reset.
    """
    now = now or timezone.now()
    with transaction.atomic():
        rows = list(Delivery.objects.select_for_update().filter(pk__in=delivery_ids).values_list("pk", "job_id"))
        Delivery.objects.filter(pk__in=[pk for pk, _ in rows]).update(
            state=DeliveryState.PENDING, next_attempt_at=now, finished_at=None,
            give_up_at=now + timedelta(seconds=settings.CAO_WEBHOOK_RETRY_FOR_S),
        )
        for job_id in {job_id for _, job_id in rows}:
            after_commit(dispatch.send_quietly, job_id)
    return len(rows)


def redispatch_lost(*, now=None, after_redis_loss=False):
    """Send again the delivery messages that were lost; returns how many were sent.

    A job's head delivery is due and free, and either its attempt's lease
    lapsed (its worker died mid-POST) or no message is marked as sent for
    it (Redis lost it) once due for CAO_REDISPATCH_GRACE_S (at once after
    a Redis loss). A message sent twice is harmless: claims are conditional.
    """
    now = now or timezone.now()
    grace = 0.0 if after_redis_loss else settings.CAO_REDISPATCH_GRACE_S
    candidates = selectors.jobs_with_due_deliveries(due_before=now - timedelta(seconds=grace), now=now)
    marked = dispatch.queued_markers([job_id for job_id, lapsed in candidates if not lapsed])
    sent = 0
    for job_id, lapsed in candidates:
        if lapsed or after_redis_loss or str(job_id) not in marked:
            dispatch.send_quietly(job_id)
            sent += 1
    if sent:
        logger.info("Re-sent %s webhook delivery message(s) that were lost.", sent)
    return sent
