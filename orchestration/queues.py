"""How many step messages wait in each queue, read from the broker."""

import dramatiq
from django.conf import settings
from dramatiq.brokers.redis import RedisBroker


def queue_depths(queues=None, *, broker=None):
    """(queue, ready, delayed) for each of ``queues`` (default: CAO_QUEUES).

    ready: messages no worker has fetched yet; delayed: retries waiting for
    their time (on the queue's delay queue, fetched or not).
    """
    broker = broker or dramatiq.get_broker()
    for queue in settings.CAO_QUEUES if queues is None else queues:
        if isinstance(broker, RedisBroker):
            key = f"{broker.namespace}:{queue}"
            yield queue, broker.client.llen(key), broker.client.hlen(f"{key}.DQ.msgs")
        elif hasattr(broker, "get_queue_message_counts"):
            ready, delayed, _dead = broker.get_queue_message_counts(queue)
            yield queue, ready, delayed
