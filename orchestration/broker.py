"""A Redis broker whose idle consumers wake up when work arrives.

Dramatiq's Redis consumer polls an empty queue with exponential backoff up
to ``worker_timeout`` (1 s by default): at low load that alone can add up to
a second per step. Polling faster would burn CPU while idle. Instead, every
enqueue also pushes a token onto a per-queue notification list, and an idle
consumer waits on that list with BLPOP: it wakes within a round trip of an
enqueue and costs nothing while the queue stays empty. It still fetches at
least every ``worker_timeout`` (that fetch is also its broker heartbeat), so
a lost notification delays a message by at most that long.
"""

import threading
import time

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

# The Dramatiq release whose internals this module (``_RedisConsumer``'s
# fields: message_cache, misses, queued_message_ids, outstanding_message_count,
# prefetch, timeout; ``do_fetch``; the consumer thread's ``delay_queue``) and
# ``maintenance.return_messages_of_dead_workers`` (a ``do_*`` command runs the
# dispatch script's dead-worker sweep) were checked against. Pinned in
# requirements.txt; tests/test_dramatiq_internals.py fails when it changes.
DRAMATIQ_VERSION = "2.2.1"

# Pending wake-ups beyond a few are redundant: a woken consumer fetches up to
# its whole prefetch, and stale tokens would make idle consumers fetch in vain.
MAX_PENDING_NOTIFICATIONS = 4
# Delay queues hold fetched messages in memory until their eta (in the
# consumer thread's ``delay_queue``); their consumer wakes for the earliest.
# Without access to it, this bounds how late a retry can start.
DELAY_QUEUE_FALLBACK_WAIT_S = 0.25
# A consumer whose prefetch is full has nothing to fetch: pause briefly.
BUSY_PAUSE_S = 0.02


class NotifyingRedisBroker(RedisBroker):
    """RedisBroker + a wake-up list per queue (``<namespace>:<queue>.notify``)."""

    @property
    def consumer_class(self):
        return _WakeableConsumer

    def notify_key(self, queue_name):
        return f"{self.namespace}:{queue_name}.notify"

    def enqueue(self, message, *, delay=None, also=None):
        """Enqueue, then wake the queue's idle consumers.

        ``also(pipeline)`` may add commands on this broker's Redis to the
        wake-up's round trip; they run only once the message is enqueued.
        """
        # The returned copy names the queue it went to (the delay queue if delayed).
        message = super().enqueue(message, delay=delay)
        key = self.notify_key(message.queue_name)
        pipeline = self.client.pipeline(transaction=False)
        pipeline.lpush(key, 1)
        pipeline.ltrim(key, 0, MAX_PENDING_NOTIFICATIONS - 1)
        if also is not None:
            also(pipeline)
        pipeline.execute()
        return message

    def wait_for_work(self, queue_name, timeout_s):
        """Block until an enqueue on ``queue_name`` or ``timeout_s``."""
        self.client.blpop([self.notify_key(queue_name)], timeout=timeout_s)


class _WakeableConsumer(_RedisConsumer):
    """Dramatiq's Redis consumer, waiting for a notification instead of sleeping."""

    def __next__(self):
        try:
            while True:
                if self.message_cache:
                    data = self.message_cache.pop(0)
                    if data is None:
                        continue
                    self.misses = 0
                    message = Message.decode(data)
                    self.queued_message_ids.add(message.message_id)
                    return MessageProxy(message)
                if self.outstanding_message_count >= self.prefetch:
                    time.sleep(BUSY_PAUSE_S)
                    return None
                self.message_cache = self.broker.do_fetch(
                    self.queue_name, self.prefetch - self.outstanding_message_count
                )
                if self.message_cache:
                    continue
                self.broker.wait_for_work(self.queue_name, self._wait_s())
                return None
        except redis.ConnectionError as exc:
            raise ConnectionClosed(exc) from None

    def _wait_s(self):
        wait_s = self.timeout / 1000
        if not self.queue_name.endswith(".DQ"):
            return wait_s
        # Dramatiq's ConsumerThread keeps fetched delayed messages in a heap
        # ordered by eta (ms); wake when the first one is due.
        pending = getattr(threading.current_thread(), "delay_queue", None)
        heap = getattr(pending, "queue", None)
        if heap is None:
            return min(wait_s, DELAY_QUEUE_FALLBACK_WAIT_S)
        if heap:
            due_in_s = (heap[0].priority - time.time() * 1000) / 1000
            wait_s = min(wait_s, max(0.001, due_in_s))
        return wait_s
