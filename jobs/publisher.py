"""Push job events to Channels groups from any thread, over long-lived connections.

``async_to_sync(layer.group_send)`` from a worker thread runs each call on a
fresh event loop, and channels-redis keeps its connection pools per loop: a
new Redis connection per event. Instead one daemon thread per process runs a
single event loop with one pool (a real OS thread, even in a green worker:
common.green.start_os_thread), and a single task drains a queue so pushes
leave in the order they were published.
"""

import asyncio
import logging
import os
import threading

from channels.layers import get_channel_layer

from common import green

logger = logging.getLogger(__name__)


def group_name(job_id):
    """The Channels group of a job's live subscribers."""
    return f"job.{job_id}"


class EventPublisher:
    """Fire-and-forget pushes; the stored event log stays the source of truth."""

    def __init__(self, layer_alias="default"):
        self.layer_alias = layer_alias
        self._lock = threading.Lock()
        self._loop = None
        self._queue = None
        self._pid = None

    def publish(self, job_id, payloads):
        if not payloads:
            return
        loop, queue = self._running_loop()
        loop.call_soon_threadsafe(queue.put_nowait, (group_name(job_id), list(payloads)))

    def _running_loop(self):
        with self._lock:
            # A forked worker process inherits the object but not the thread.
            if self._loop is None or self._pid != os.getpid():
                self._pid = os.getpid()
                # Pushes published before the loop starts wait in its queue of callbacks.
                self._loop = green.new_event_loop()
                self._queue = asyncio.Queue()
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
                await layer.group_send(group, {"type": "job.events", "events": payloads})
            except Exception:
                # Subscribers recover missed events from the log (gap detection).
                logger.warning("Could not push %d event(s) to %s", len(payloads), group, exc_info=True)


_publisher = EventPublisher()


def get_publisher():
    return _publisher
