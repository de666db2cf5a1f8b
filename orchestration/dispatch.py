"""Sending step messages.

``send_step`` enqueues a step's message on its service's queue and marks it
as sent (what maintenance checks before re-sending). Callers inside a
transaction use ``send_after_commit``: a message must never leave before the
state it announces is committed.
"""

import logging
import dramatiq
from django.conf import settings

from common.after_commit import after_commit
from common.redis import get_redis
from orchestration.broker import NotifyingRedisBroker
from orchestration.messages import step_message, step_time_limit_s
from services_registry.selectors import service_live

logger = logging.getLogger(__name__)

DISPATCH_MARKER = "cao:dispatched:{job_id}"


def send_step(dispatch, *, first=()):
    """Enqueue a step message on its service's queue and mark it as sent.

    ``first``: calls of the gateway's Lua scripts (``common.redis.ScriptCall``,
    e.g. the release of the sender's slot) to run before the enqueue, in its
    round trip when the broker's Redis is the gateway's own. Returns each
    one's result, or the exception it raised; the message is sent either way.
    """
    service = service_live(dispatch.service)
    # A deleted service still gets a message, so the engine fails the job
    # with a clear error instead of leaving it queued forever.
    queue = service.queue if service and service.queue in settings.CAO_QUEUES else settings.CAO_QUEUES[-1]
    message = step_message(
        queue=queue,
        job_id=dispatch.job_id,
        step_index=dispatch.step_index,
        token=dispatch.token,
        service=dispatch.service,
        tenant=dispatch.tenant,
        priority=dispatch.priority,
        time_limit_s=step_time_limit_s(
            service.effective_timeout_s if service else settings.HTTP_READ_TIMEOUT_S,
            record_retry_s=settings.CAO_RECORD_RETRY_S,
            connect_timeout_s=settings.HTTP_CONNECT_TIMEOUT_S,
        ),
    )
    delay_ms = int(dispatch.delay_s * 1000) or None
    # Maintenance re-sends a queued step only when this marker is gone, which
    # happens when Redis lost its data (and the message with it) or after a
    # generous TTL (a message stuck in the broker that long is presumed lost).
    # It is set once the message is enqueued: in the broker's wake-up round
    # trip when the broker's Redis is the gateway's own.
    marker_ms = (delay_ms or 0) + int(settings.CAO_DISPATCH_MARKER_TTL_S * 1000)
    marker = DISPATCH_MARKER.format(job_id=dispatch.job_id)
    broker = dramatiq.get_broker()
    if isinstance(broker, NotifyingRedisBroker) and settings.BROKER_URL == settings.REDIS_URL:
        _, results = broker.enqueue_after(
            first, message, delay=delay_ms, also=lambda pipeline: pipeline.set(marker, dispatch.token, px=marker_ms)
        )
    else:
        results = [call.outcome() for call in first]
        broker.enqueue(message, delay=delay_ms)
        get_redis().set(marker, dispatch.token, px=marker_ms)
    logger.debug(
        "Sent job_id=%s step_index=%s token=%s to queue %s (delay %s ms).",
        dispatch.job_id, dispatch.step_index, dispatch.token, queue, delay_ms or 0,
    )
    return results


def send_quietly(dispatch):
    """``send_step``, logging instead of raising (maintenance re-sends a message whose marker is missing)."""
    try:
        send_step(dispatch)
    except Exception:
        log_unsent(dispatch)


def log_unsent(dispatch):
    """Say (from an ``except`` block) that ``dispatch`` could not be sent."""
    logger.warning(
        "Could not send job_id=%s step_index=%s; maintenance will re-send it.",
        dispatch.job_id, dispatch.step_index, exc_info=True,
    )


def dispatched_token(job_id):
    """The token of the last step message sent for ``job_id``, or None."""
    value = get_redis().get(DISPATCH_MARKER.format(job_id=job_id))
    return int(value) if value is not None else None


def send_after_commit(dispatch):
    """Send the step message once the transaction commits (maintenance re-sends it if this fails)."""
    after_commit(send_step, dispatch)
