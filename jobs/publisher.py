"""Push job events to Channels groups from any thread, over long-lived connections.

``async_to_sync(layer.group_send)`` from a worker thread runs each call on a
fresh event loop, and channels-redis keeps its connection pools per loop: a
new Redis connection per event. Instead one daemon thread per process runs a
single event loop with one pool (a real OS thread, even in a green worker:
common.green.start_os_thread), and a single task drains a queue so pushes
leave in the order they were published.

Nothing here may silence a process for long: each push has
CAO_PUSH_TIMEOUT_S, after which the layer's connections are dropped and
made afresh (a half-open connection would otherwise hang every later push),
and the queue holds at most ``max_pending`` pushes, the oldest dropped
first. Subscribers read whatever a push missed from the log.

A step's record holds its pushes (``held``) so that they ride in the Redis
round trip that releases its slot and sends the job's next message, ahead
of both: one PUBLISH each, in the order published, with no hop to the
publisher's thread. That works when the channel layer is channels-redis's
pub/sub layer on the gateway's own Redis; otherwise, and for whatever is
not taken, the held pushes go through the publisher when the hold ends.
"""

import asyncio
import contextvars
import logging
import os
import threading
from contextlib import contextmanager

from channels.layers import get_channel_layer
from django.conf import settings

from common import green
from common.redis import CommandCall, get_redis

logger = logging.getLogger(__name__)

# Pushes waiting for the publisher's loop, at most (a Redis that stopped
# answering must not let them grow without bound).
MAX_PENDING_PUSHES = 10_000

PUBSUB_LAYER = "channels_redis.pubsub.RedisPubSubChannelLayer"

# The pushes held in this thread (or greenlet), if any: ``EventPublisher.held``.
_held = contextvars.ContextVar("cao_held_pushes", default=None)


def group_name(job_id):
    """The Channels group of a job's live subscribers."""
    return f"job.{job_id}"


def group_channel(prefix, job_id):
    """The Redis channel channels-redis's pub/sub layer (with ``prefix``) publishes a job's group on."""
    return f"{prefix}__group__{group_name(job_id)}"


def push_message(payloads):
    """The channel-layer message a push of ``payloads`` (events of one job) is."""
    return {"type": "job.events", "events": list(payloads)}


class HeldPushes:
    """Pushes published while held, in order; see ``EventPublisher.held``."""

    def __init__(self, publisher):
        self.publisher = publisher
        self._pushes = []

    def add(self, job_id, payloads):
        self._pushes.append((job_id, payloads))

    def take_calls(self):
        """The held pushes as PUBLISH commands for a round trip to the gateway's Redis, which then owns them.

        Empty (and the pushes stay held) when the channel layer cannot be
        reached that way.
        """
        calls = self.publisher.publish_calls(self._pushes)
        if calls:
            self._pushes = []
        return calls

    def release(self):
        """Publish what is still held, as usual."""
        pushes, self._pushes = self._pushes, []
        for job_id, payloads in pushes:
            self.publisher.publish(job_id, payloads)


class EventPublisher:
    """Fire-and-forget pushes; the stored event log stays the source of truth."""

    def __init__(self, layer_alias="default", *, max_pending=MAX_PENDING_PUSHES):
        self.layer_alias = layer_alias
        self.max_pending = max_pending
        self.dropped = 0  # pushes dropped because the queue was full
        self._lock = threading.Lock()
        self._loop = None
        self._queue = None
        self._pid = None

    def publish(self, job_id, payloads):
        if not payloads:
            return
        held = _held.get()
        if held is not None and held.publisher is self:
            held.add(job_id, list(payloads))
            return
        loop, queue = self._running_loop()
        loop.call_soon_threadsafe(self._offer, queue, (group_name(job_id), list(payloads)))

    @contextmanager
    def held(self):
        """Hold what this thread publishes in the block (``HeldPushes``); what is left is published at its end."""
        pushes = HeldPushes(self)
        token = _held.set(pushes)
        try:
            yield pushes
        finally:
            _held.reset(token)
            pushes.release()

    def publish_calls(self, pushes):
        """``pushes`` (job id, payloads) as PUBLISH commands on the gateway's Redis, as the layer would send them.

        Empty unless the layer is channels-redis's pub/sub layer with the
        gateway's Redis as its one host (``tests/test_publisher.py`` checks
        that its subscribers receive them).
        """
        alias = settings.CHANNEL_LAYERS.get(self.layer_alias, {})
        config = alias.get("CONFIG", {})
        if not pushes or alias.get("BACKEND") != PUBSUB_LAYER or config.get("hosts") != [settings.REDIS_URL]:
            return []
        layer = get_channel_layer(self.layer_alias)
        prefix = config.get("prefix", "asgi")
        client = get_redis()
        return [
            CommandCall(client, "PUBLISH", group_channel(prefix, job_id), layer.serialize(push_message(payloads)))
            for job_id, payloads in pushes
        ]

    def _offer(self, queue, push):
        if queue.full():
            queue.get_nowait()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning("The push queue is full; dropped the oldest push (%d so far).", self.dropped)
        queue.put_nowait(push)

    def _running_loop(self):
        with self._lock:
            # A forked worker process inherits the object but not the thread.
            if self._loop is None or self._pid != os.getpid():
                self._pid = os.getpid()
                # Pushes published before the loop starts wait in its queue of callbacks.
                self._loop = green.new_event_loop()
                self._queue = asyncio.Queue(maxsize=self.max_pending)
                green.start_os_thread(self._run, self._loop, self._queue, name="event-publisher")
            return self._loop, self._queue

    def _run(self, loop, queue):
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._drain(queue))

    async def _drain(self, queue):
        layer = get_channel_layer(self.layer_alias)
        while True:
            group, payloads = await queue.get()
            try:
                await asyncio.wait_for(
                    layer.group_send(group, push_message(payloads)), settings.CAO_PUSH_TIMEOUT_S
                )
            except asyncio.TimeoutError:
                logger.warning(
                    "A push to %s took over %.1f s; reconnecting to the channel layer.", group, settings.CAO_PUSH_TIMEOUT_S
                )
                await self._reset(layer)
            except Exception:
                # Subscribers recover missed events from the log (gap detection).
                logger.warning("Could not push %d event(s) to %s", len(payloads), group, exc_info=True)

    async def _reset(self, layer):
        # The list layer can drop its connections and keep its data; the
        # pub/sub layer's flush only drops connections (and the subscriptions
        # of this loop, which publishes and has none).
        close_pools = getattr(layer, "close_pools", None)
        try:
            await asyncio.wait_for(close_pools() if close_pools else layer.flush(), settings.CAO_PUSH_TIMEOUT_S)
        except Exception:
            logger.warning("Could not reset the channel layer's connections.", exc_info=True)


_publisher = EventPublisher()


def get_publisher():
    return _publisher
