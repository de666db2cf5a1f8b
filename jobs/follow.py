"""Following one job's events: every seq exactly once, in order, whatever the pushes do.

Both live views of a job follow it through here: the WebSocket consumer
(``jobs.consumers``) and the Server-Sent Events stream (``jobs.sse``). Each
only frames and sends what the follower yields.

Pushes on the channel layer are the fast path; the log (``JobEvent`` rows)
is the truth. A subscriber joins the job's group *before* it first reads the
log, which closes the race: an event committed before the read is in the
log, one committed after it is pushed to the group. From then on:

- a pushed event whose seq was already delivered is dropped (a push retried,
  or one that the log read delivered first);
- a pushed event beyond the next seq means earlier pushes were lost or
  overtaken: the missing events are read from the log first;
- a resync (every CAO_WS_RESYNC_S while the job is active, and on a
  WebSocket ping) reads the log beyond the last seq delivered, so a lost push
  is recovered even when nothing follows it (the final JOB_COMPLETED, say).

A channel-layer error (Redis restarting) never ends a follow: ``PushInbox``
waits it out with backoff, a failed join is retried by the next resync,
and the log keeps the subscriber current meanwhile.
"""

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings
from django.db import DatabaseError

from jobs import selectors
from jobs.publisher import group_name

# Events read from the log per query.
REPLAY_BATCH = 500
# Events after which the job emits nothing more (a FAILED job may be resumed).
FINAL_EVENTS = frozenset({"JOB_COMPLETED", "JOB_CANCELLED"})
# Waits between tries to reach a failing channel layer.
LAYER_RETRY_S = (0.5, 1.0, 2.0, 5.0)
# What publisher pushes look like on the channel layer (``jobs.publisher``).
EVENTS_MESSAGE = "job.events"

logger = logging.getLogger(__name__)


def resync_interval():
    """Seconds between log re-reads of an active job's subscriber, or None when resyncing is off."""
    interval = settings.CAO_WS_RESYNC_S
    return interval if interval > 0 else None


class PushInbox:
    """One subscriber's channel on the channel layer: joins a job's group, receives what is pushed to it.

    Layer errors are logged and waited out, never raised: the log is the
    subscriber's fallback while the layer is away.
    """

    def __init__(self, layer, channel_name, *, retry_s=LAYER_RETRY_S, sleep=asyncio.sleep):
        self.layer = layer
        self.channel_name = channel_name
        self.group = None
        self.retry_s = retry_s
        self.sleep = sleep
        self.failures = 0

    async def join(self, group):
        """Join ``group`` (idempotent, and it renews the membership's expiry); False when the layer failed."""
        self.group = group
        try:
            await self.layer.group_add(group, self.channel_name)
        except Exception:
            logger.warning("Could not join %s; following the log until the next resync.", group)
            return False
        return True

    async def leave(self):
        if self.group is None:
            return
        group, self.group = self.group, None
        try:
            await self.layer.group_discard(group, self.channel_name)
        except Exception:
            pass  # the membership expires by itself (channels-redis group_expiry)

    async def receive(self):
        """The next message pushed to this channel, however long the layer takes to answer again."""
        while True:
            try:
                message = await self.layer.receive(self.channel_name)
            except Exception:
                await self._failed()
                continue
            self.failures = 0
            return message

    async def _failed(self):
        self.failures += 1
        if self.failures == 1:
            logger.warning("Channel layer receive failed for %s; following the log.", self.group or self.channel_name)
        await self.sleep(self.retry_s[min(self.failures, len(self.retry_s)) - 1])


class EventFollower:
    """Yields a job's events after ``after``, each seq once and in order, from pushes and the log.

    ``last_seq`` is the last seq yielded; ``finished`` turns true once a
    FINAL_EVENTS event was yielded (nothing follows it, so resyncs can stop).
    ``read_events(job_id, after=, through=, limit=)`` is awaited for the
    log (by default ``selectors.job_events`` in Django's database thread).
    """

    def __init__(self, job_id, *, after=0, inbox=None, read_events=None):
        self.job_id = str(job_id)
        self.group = group_name(self.job_id)
        self.last_seq = after
        self.finished = False
        self.inbox = inbox
        self.read_events = read_events or database_sync_to_async(selectors.job_events)

    async def join(self):
        return await self.inbox.join(self.group)

    def replay(self):
        """The first read: join the group, *then* read the log, so no event can fall between the two."""
        return self.resync(rejoin=True)

    async def catch_up(self, *, through=None):
        """Events from the log beyond ``last_seq`` (up to ``through``), read in batches; DatabaseError propagates."""
        while True:
            events = await self.read_events(self.job_id, after=self.last_seq, through=through, limit=REPLAY_BATCH)
            for event in events:
                yield self._delivered(event)
            if len(events) < REPLAY_BATCH:
                return

    async def resync(self, *, rejoin=False):
        """``catch_up``, first rejoining the group if asked (Redis may have lost it); a database error waits for the next one."""
        if rejoin:
            await self.join()
        try:
            async for event in self.catch_up():
                yield event
        except DatabaseError:
            logger.warning("Could not read the log of job %s; retrying at the next resync.", self.job_id)

    async def pushed(self, events):
        """Live events pushed after commit: duplicates dropped, a gap filled from the log first."""
        for event in events:
            seq = event["seq"]
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1:
                try:
                    async for missing in self.catch_up(through=seq - 1):
                        yield missing
                except DatabaseError:
                    # Delivering this push now would skip the gap: the next
                    # resync reads it and everything after it from the log.
                    logger.warning("Could not fill a gap in job %s's events; the next resync will.", self.job_id)
                    return
                if seq != self.last_seq + 1:
                    continue  # the log does not hold the gap yet; the next resync reads it in order
            yield self._delivered(event)

    async def messages(self, message):
        """The events of one channel-layer message (anything but a push of events holds none)."""
        if message.get("type") != EVENTS_MESSAGE:
            return
        async for event in self.pushed(message.get("events", ())):
            yield event

    def _delivered(self, event):
        self.last_seq = event["seq"]
        if event.get("type") in FINAL_EVENTS:
            self.finished = True
        return event
