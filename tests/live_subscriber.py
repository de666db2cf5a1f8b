"""A live subscriber to a job's pushes for tests, on the real channel layer.

The pub/sub channel layer keeps its subscriptions per event loop, so a
subscriber must live in one loop for as long as it listens: this one runs
its own loop in a thread, joins the job's group there, and collects what is
pushed until it is closed.
"""

import asyncio
import threading

from channels.layers import get_channel_layer
from django.conf import settings

from jobs import publisher
from jobs.publisher import group_name
from scripts.polling import wait_until


def group_channel(job_id):
    """The Redis pub/sub channel of a job's group (how channels-redis's pub/sub layer names it)."""
    return publisher.group_channel(settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"], job_id)


def group_subscribers(redis_client, job_id):
    """How many connections are subscribed to the job's group: one per process following it."""
    [(_, count)] = redis_client.pubsub_numsub(group_channel(job_id))
    return count


class LiveSubscriber:
    """``with LiveSubscriber(job_id) as subscriber``: joined once entered; ``seqs(until=...)`` waits for pushes."""

    def __init__(self, job_id):
        self.job_id = job_id
        self.messages = []
        self._lock = threading.Lock()
        self._joined = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="live-subscriber")
        self._task = None

    def __enter__(self):
        self._thread.start()
        self._task = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        if not self._joined.wait(10):
            raise TimeoutError("the subscriber did not join its job's group within 10 s")
        return self

    def __exit__(self, *exc):
        self._task.cancel()
        asyncio.run_coroutine_threadsafe(get_channel_layer().flush(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _listen(self):
        layer = get_channel_layer()
        channel = await layer.new_channel()
        await layer.group_add(group_name(self.job_id), channel)
        self._joined.set()
        while True:
            message = await layer.receive(channel)
            with self._lock:
                self.messages.append(message)

    def pushed_seqs(self):
        with self._lock:
            return {event["seq"] for message in self.messages for event in message.get("events", ())}

    def seqs(self, *, until, timeout=10):
        """The seqs pushed so far, once they include ``until`` (TimeoutError after ``timeout``)."""
        wait_until(lambda: until <= self.pushed_seqs(), timeout=timeout, message=f"pushes of seqs {sorted(until)}")
        return self.pushed_seqs()
