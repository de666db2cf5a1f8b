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
- a pushed event beyond the next seq was overtaken, or earlier pushes were
  lost. Overtaking is the common case: a step's STEP_COMPLETED is pushed by
  one worker after it sent the next step's message, whose worker may push
  STEP_STARTED first. So the early event is held for up to
  CAO_FOLLOW_REORDER_WAIT_S for the missing ones to arrive; only if they do
  not is the gap read from the log (``gap_wait_s`` says when, and
  ``fill_gap`` does it), so a busy API does not read the log once per step
  and subscriber;
- a resync (after CAO_WS_RESYNC_S without a push while the job is active,
  and on a WebSocket ping) reads the log beyond the last seq delivered, so a
  lost push is recovered even when nothing follows it (the final
  JOB_COMPLETED, say). A follower that pushes keep reaching is evidently in
  its group, so busy jobs cost no periodic reads of the log
  (``resync_wait_s``).

A channel-layer error (Redis restarting) never ends a follow: ``PushInbox``
waits it out with backoff, a failed join is retried by the next resync,
and the log keeps the subscriber current meanwhile.
"""

import asyncio
import logging
import time

from django.conf import settings
from django.db import DatabaseError

from jobs import selectors
from jobs.live_reads import live_read
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


def reorder_wait_s():
    """How long a push that overtook an earlier one waits for it before the log fills the gap."""
    return max(settings.CAO_FOLLOW_REORDER_WAIT_S, 0.0)


def resync_interval():
    """Seconds between log re-reads of an active job's subscriber, or None when resyncing is off."""
    interval = settings.CAO_WS_RESYNC_S
    return interval if interval > 0 else None


class PushInbox:
    """One subscriber's channel on the channel layer: joins a job's group, receives what is pushed to it.

    Layer errors are logged and waited out, never raised: the log is the
    subscriber's fallback while the layer is away. The channel is made at
    the first join that reaches the layer (with the pub/sub layer, making
    one subscribes), so a subscriber that starts while Redis is down follows
    the log until a resync's join gets through.
    """

    def __init__(self, layer, channel_name=None, *, retry_s=LAYER_RETRY_S, sleep=asyncio.sleep):
        self.layer = layer
        self.channel_name = channel_name
        self.group = None
        self.retry_s = retry_s
        self.sleep = sleep
        self.failures = 0
        self._opened = asyncio.Event()
        if channel_name is not None:
            self._opened.set()

    async def join(self, group):
        """Join ``group`` (idempotent, and it renews the membership's expiry); False when the layer failed."""
        self.group = group
        try:
            if self.channel_name is None:
                # A try that fails leaves channels-redis an empty queue it
                # never hands out: a few bytes, per retry of a subscriber
                # that started while Redis was down.
                self.channel_name = await self.layer.new_channel()
                self._opened.set()
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
            pass  # the subscription ends with the connection; a stale one only costs ignored messages

    async def receive(self):
        """The next message pushed to this channel, however long the layer takes to answer again."""
        await self._opened.wait()
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
    Pushes that overtook earlier ones wait in ``early``; ``on_gap()`` is
    called when such a wait starts, so the caller can wake up for it.
    """

    def __init__(self, job_id, *, after=0, inbox=None, read_events=None, on_gap=None, clock=time.monotonic):
        self.job_id = str(job_id)
        self.group = group_name(self.job_id)
        self.last_seq = after
        self.finished = False
        self.inbox = inbox
        self.read_events = read_events or live_read(selectors.job_events)
        self.early = {}
        self.on_gap = on_gap
        self.clock = clock
        self._gap_deadline = None
        self._heard_at = clock()  # the last push or read of the log

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
        self._heard_at = self.clock()
        if rejoin:
            await self.join()
        try:
            async for event in self.catch_up():
                yield event
        except DatabaseError:
            logger.warning("Could not read the log of job %s; retrying at the next resync.", self.job_id)
        for event in self._release_early():
            yield event

    async def pushed(self, events):
        """Live events pushed after commit: duplicates dropped, one that overtook an earlier one held for it."""
        self._heard_at = self.clock()
        for event in events:
            seq = event["seq"]
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1:
                self._hold(event)
                continue
            yield self._delivered(event)
            for held in self._release_early():
                yield held
        if self.early and reorder_wait_s() == 0:
            async for event in self.fill_gap():
                yield event

    def resync_wait_s(self):
        """Seconds until the log is due to be re-read (0: now), or None when resyncs are off or the job is done."""
        interval = resync_interval()
        if interval is None or self.finished:
            return None
        return max(self._heard_at + interval - self.clock(), 0.0)

    def gap_wait_s(self):
        """Seconds until a held push's gap must be read from the log (0: now), or None when nothing is held."""
        if self._gap_deadline is None:
            return None
        return max(self._gap_deadline - self.clock(), 0.0)

    async def fill_gap(self):
        """The events the held pushes overtook, from the log, then the held pushes that follow them."""
        self._gap_deadline = None
        if not self.early:
            return
        try:
            async for event in self.catch_up(through=max(self.early)):
                yield event
        except DatabaseError:
            # Delivering the held pushes now would skip the gap: the next
            # resync reads it and everything after it from the log.
            logger.warning("Could not fill a gap in job %s's events; the next resync will.", self.job_id)
            return
        # What the log does not hold yet stays held: the next resync reads it in order.
        for event in self._release_early():
            yield event

    def _hold(self, event):
        self.early[event["seq"]] = event
        if self._gap_deadline is None:
            self._gap_deadline = self.clock() + reorder_wait_s()
            if self.on_gap is not None:
                self.on_gap()

    def _release_early(self):
        """The held pushes that are next in order now; held ones already delivered are dropped."""
        released = []
        while self.last_seq + 1 in self.early:
            released.append(self._delivered(self.early.pop(self.last_seq + 1)))
        for seq in [seq for seq in self.early if seq <= self.last_seq]:
            del self.early[seq]
        if not self.early:
            self._gap_deadline = None
        return released

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
