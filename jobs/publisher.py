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

When the channel layer is channels-redis's pub/sub layer on the gateway's
own Redis, a push is a plain PUBLISH the gateway can send itself:

- a step's record holds its pushes (``held``) so that they ride in the
  Redis round trip that releases its slot and sends the job's next message,
  ahead of both, in the order published;
- a green worker sends the rest from one greenlet (``GreenSender``), a
  pipeline per batch, instead of handing them to an OS thread: the hop
  cost each push a wake-up of that thread and a fight for the GIL with
  the greenlets, and the claim's STEP_STARTED paid it before its call.

Otherwise, and for whatever is not taken, pushes go through the thread.
"""

import asyncio
import collections
import contextvars
import logging
import os
import threading
from contextlib import contextmanager

import redis

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


class GreenSender:
    """A green process's pushes, sent in order by one greenlet: each batch pending is one pipeline of PUBLISH.

    It runs whenever the publishing greenlet waits (on its call, say), so a
    push costs that greenlet no round trip. It holds at most ``max_pending``
    pushes, the oldest dropped first, and each batch has CAO_PUSH_TIMEOUT_S
    (its own connections: redis-py drops one that timed out), so a Redis
    that stopped answering delays pushes, never the greenlets that publish.
    """

    def __init__(self, publisher, *, max_pending):
        import gevent.event

        self.publisher = publisher
        self._pending = collections.deque()
        self._max_pending = max_pending
        self._wake = gevent.event.Event()
        self._client = None
        self._greenlet = None
        self._sending = False

    def offer(self, push):
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.publisher.count_dropped()
        self._pending.append(push)
        if self._greenlet is None:
            import gevent

            self._greenlet = gevent.spawn(self._run)
        self._wake.set()

    @property
    def idle(self):
        """Whether every push offered so far has been sent (or given up on)."""
        return not (self._pending or self._sending or self._wake.is_set())

    def _run(self):
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = list(self._pending)
                self._pending.clear()
                self._sending = True
                try:
                    self._send(batch)
                except Exception:
                    # Subscribers read what the batch missed from the log.
                    logger.warning("Could not push the events of %d push(es).", len(batch), exc_info=True)
                finally:
                    self._sending = False

    def _send(self, batch):
        calls = self.publisher.publish_calls(batch, client=self._redis())
        if not calls:  # the layer changed under a running process (tests): the usual way
            for job_id, payloads in batch:
                self.publisher.publish_via_thread(job_id, payloads)
            return
        pipeline = self._redis().pipeline(transaction=False)
        for call in calls:
            call.queue(pipeline)
        pipeline.execute()

    def _redis(self):
        if self._client is None:
            self._client = redis.Redis.from_url(
                settings.REDIS_URL,
                socket_connect_timeout=settings.CAO_PUSH_TIMEOUT_S,
                socket_timeout=settings.CAO_PUSH_TIMEOUT_S,
            )
        return self._client


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
        self._green = None

    def publish(self, job_id, payloads):
        if not payloads:
            return
        held = _held.get()
        if held is not None and held.publisher is self:
            held.add(job_id, list(payloads))
            return
        if green.active() and self.sends_publish_commands():
            self.green_sender().offer((job_id, list(payloads)))
            return
        self.publish_via_thread(job_id, payloads)

    def publish_via_thread(self, job_id, payloads):
        """Hand the push to the publisher's thread and its event loop."""
        loop, queue = self._running_loop()
        loop.call_soon_threadsafe(self._offer, queue, (group_name(job_id), list(payloads)))

    def green_sender(self):
        """This (green) process's ``GreenSender``."""
        with self._lock:
            if self._green is None or self._green[0] != os.getpid():
                self._green = (os.getpid(), GreenSender(self, max_pending=self.max_pending))
            return self._green[1]

    def count_dropped(self):
        self.dropped += 1
        if self.dropped == 1 or self.dropped % 1000 == 0:
            logger.warning("The push queue is full; dropped the oldest push (%d so far).", self.dropped)

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

    def sends_publish_commands(self):
        """Whether a push can be a PUBLISH on the gateway's Redis: the layer is the pub/sub one, on that Redis alone."""
        alias = settings.CHANNEL_LAYERS.get(self.layer_alias, {})
        return alias.get("BACKEND") == PUBSUB_LAYER and alias.get("CONFIG", {}).get("hosts") == [settings.REDIS_URL]

    def publish_calls(self, pushes, *, client=None):
        """``pushes`` (job id, payloads) as PUBLISH commands on the gateway's Redis, as the layer would send them.

        Empty unless ``sends_publish_commands()`` (``tests/test_publisher.py``
        checks that the layer's subscribers receive them). ``client``: the
        Redis client they run on (default: the process's).
        """
        if not pushes or not self.sends_publish_commands():
            return []
        layer = get_channel_layer(self.layer_alias)
        prefix = settings.CHANNEL_LAYERS[self.layer_alias].get("CONFIG", {}).get("prefix", "asgi")
        client = client or get_redis()
        return [
            CommandCall(client, "PUBLISH", group_channel(prefix, job_id), layer.serialize(push_message(payloads)))
            for job_id, payloads in pushes
        ]

    def _offer(self, queue, push):
        if queue.full():
            queue.get_nowait()
            self.count_dropped()
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
