"""The delivery actor: a thin interface on its own queue (CAO_WEBHOOK_QUEUE), so receivers never hold step workers."""

import dramatiq
from django.conf import settings

from common.backends import BACKEND_ERRORS
from webhooks import delivery
from webhooks.dispatch import ACTOR_NAME, send_delivery


def _retry_when(retries, exception):
    # PostgreSQL or Redis failed: retried with backoff; the row stays pending meanwhile.
    return isinstance(exception, BACKEND_ERRORS) and retries < settings.CAO_INFRA_MAX_RETRIES


@dramatiq.actor(
    actor_name=ACTOR_NAME,
    queue_name=settings.CAO_WEBHOOK_QUEUE,
    retry_when=_retry_when,
    min_backoff=500,
    max_backoff=30_000,
    time_limit=int((delivery.lease_s() + 30) * 1000),
)
def deliver_webhooks(job_id):
    following = delivery.deliver_next(job_id)
    if following is not None:
        send_delivery(job_id, delay_s=following.delay_s)
