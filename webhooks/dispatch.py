"""Sending delivery messages: one per job, on the webhooks queue, after the state it announces is committed.

A message says "deliver job X's next pending event": it carries the job id
only, and the row in PostgreSQL says what to send. A marker in Redis,
set once the message is enqueued, tells maintenance the message exists;
when Redis loses both (a restart without persistence), maintenance finds
due deliveries without a marker and sends their message again
(``webhooks.services.redispatch_lost``). A duplicate message is harmless:
the claim is a conditional update.
"""

import logging

import dramatiq
from django.conf import settings
from dramatiq import Message

from common.redis import get_redis

logger = logging.getLogger(__name__)

ACTOR_NAME = "deliver_webhooks"
QUEUED_MARKER = "cao:webhook:queued:{job_id}"


def delivery_message(job_id):
    return Message(
        queue_name=settings.CAO_WEBHOOK_QUEUE, actor_name=ACTOR_NAME, args=(str(job_id),), kwargs={}, options={},
    )


def send_delivery(job_id, *, delay_s=0.0):
    """Enqueue the delivery message of ``job_id`` (after ``delay_s``) and mark it as sent."""
    delay_ms = max(0, int(delay_s * 1000)) or None
    dramatiq.get_broker().enqueue(delivery_message(job_id), delay=delay_ms)
    marker_ms = (delay_ms or 0) + int(settings.CAO_DISPATCH_MARKER_TTL_S * 1000)
    get_redis().set(QUEUED_MARKER.format(job_id=job_id), 1, px=marker_ms)
    logger.debug("Sent the webhook delivery message of job_id=%s (delay %s ms).", job_id, delay_ms or 0)


def send_quietly(job_id, *, delay_s=0.0):
    """``send_delivery``, logging instead of raising: maintenance re-sends a message that did not leave."""
    try:
        send_delivery(job_id, delay_s=delay_s)
    except Exception:
        logger.warning("Could not send the webhook delivery message of job_id=%s; maintenance will.", job_id,
                       exc_info=True)


def queued_markers(job_ids):
    """Which of ``job_ids`` have a delivery message marked as sent."""
    job_ids = [str(job_id) for job_id in job_ids]
    if not job_ids:
        return set()
    values = get_redis().mget([QUEUED_MARKER.format(job_id=job_id) for job_id in job_ids])
    return {job_id for job_id, value in zip(job_ids, values) if value is not None}
