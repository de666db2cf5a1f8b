"""A Redis broker whose idle consumers wake up when work arrives.

Dramatiq's Redis consumer polls an empty queue with exponential backoff up
to ``worker_timeout`` (1 s by default): at low load that alone can add up to
a second per step. Polling faster would burn CPU while idle. Instead, every
enqueue also pushes a token onto a per-queue notification list, and an idle
consumer waits on that list with BLPOP: it wakes within a round trip of an
enqueue and costs nothing while the queue stays empty. It still fetches at
least every ``worker_timeout`` (that fetch is also its broker heartbeat), so
a lost notification delays a message by at most that long.

The message, its wake-up and whatever the sender adds (the dispatch marker;
the release of the sender's slot, before it) go to Redis in one round trip
(``enqueue_after``).
"""

import threading
import time
from uuid import uuid4

import redis
from dramatiq.broker import MessageProxy
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.common import current_millis, dq_name
from dramatiq.errors import ConnectionClosed
from dramatiq.message import Message

from common.redis import ScriptCall

# The Dramatiq release whose internals this module (``RedisBroker.enqueue``
# and ``_dispatch``, whose work ``enqueue_after`` does in one round trip;
# ``_RedisConsumer``'s
# fields: message_cache, misses, queued_message_ids, outstanding_message_count,
# prefetch, timeout; ``do_fetch``; the consumer thread's ``delay_queue``),
# ``middleware.QuietIdleThreads`` (the Worker's ``work_queue`` and ``workers``) and
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
        """Enqueue and wake the queue's idle consumers, in one round trip.

        ``also(pipeline)`` may add commands on this broker's Redis to that
        round trip; they run only once the message is enqueued.
        """
        return self.enqueue_after((), message, delay=delay, also=also)[0]

    def enqueue_after(self, calls, message, *, delay=None, also=None):
        """Run ``calls`` (``common.redis.ScriptCall``), then enqueue ``message``, in one round trip.

        Returns the enqueued message (it names the queue it went to: the
        delay queue if delayed) and each call's result, or the exception it
        raised: a call's failure does not undo the enqueue, which is a
        separate command. Dramatiq's enqueue hooks run as for any enqueue.
        """
        message = _stamped(message, delay)
        queue_name = message.queue_name
        self.logger.debug("Enqueueing message %r on queue %r.", message.message_id, queue_name)
        self.emit_before("enqueue", message, delay)
        push = ScriptCall(
            self.scripts["dispatch"],
            [self.namespace],
            self._dispatch_args("enqueue", queue_name, message.options["redis_message_id"], message.encode()),
        )
        pipeline = self.client.pipeline(transaction=False)
        for call in calls:
            call.queue(pipeline)
        push.queue(pipeline)
        self._notify(pipeline, queue_name, also)
        replies = pipeline.execute(raise_on_error=False)
        results = [call.outcome(reply) for call, reply in zip(calls, replies)]
        pushed, *rest = replies[len(calls):]
        if isinstance(pushed, redis.exceptions.NoScriptError):
            # The server lost its scripts (a restart): nothing after the
            # enqueue may stand without it, so do both again, loading it.
            push.run()
            pipeline = self.client.pipeline(transaction=False)
            self._notify(pipeline, queue_name, also)
            rest = pipeline.execute(raise_on_error=False)
        elif isinstance(pushed, Exception):
            raise pushed
        for reply in rest:
            if isinstance(reply, Exception):
                raise reply
        self.emit_after("enqueue", message, delay)
        return message, results

    def _notify(self, pipeline, queue_name, also):
        key = self.notify_key(queue_name)
        pipeline.lpush(key, 1)
        pipeline.ltrim(key, 0, MAX_PENDING_NOTIFICATIONS - 1)
        if also is not None:
            also(pipeline)

    def _dispatch_args(self, command, queue_name, *args):
        # The ARGV of Dramatiq's dispatch script, as RedisBroker._dispatch builds it.
        return [
            command,
            current_millis(),
            queue_name,
            self.broker_id,
            self.heartbeat_timeout,
            self.dead_message_ttl,
            self._should_do_maintenance(command),
            self._max_unpack_size(),
            *args,
        ]

    def wait_for_work(self, queue_name, timeout_s):
        """Block until an enqueue on ``queue_name`` or ``timeout_s``."""
        self.client.blpop([self.notify_key(queue_name)], timeout=timeout_s)


def _stamped(message, delay):
    """``message`` as RedisBroker.enqueue stores it: a Redis id of its own, and its eta on the delay queue."""
    # Each enqueue gets its own id: a retried message keeps its message_id.
    message = message.copy(options={"redis_message_id": str(uuid4())})
    if delay is not None:
        message = message.copy(queue_name=dq_name(message.queue_name), options={"eta": current_millis() + delay})
    return message


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
