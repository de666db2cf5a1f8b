"""``/ws/<job_id>``: a job's events, replayed from the log and then live.

On connect: authenticate (the monitor token of that job, or a staff session
from an allowed origin), send ``WS_CONNECTED`` with a snapshot, join the
job's group and replay stored events after ``?after=<seq>``, then forward
live ones. What makes every seq arrive exactly once, in order (joining before
reading the log, dropping duplicates, filling gaps, resyncing, outlasting
channel-layer errors) is ``jobs.follow``, shared with the SSE stream; this
consumer only authenticates, frames and sends.

The consumer resyncs on every client ``ping`` (before it answers ``pong``)
and after CAO_WS_RESYNC_S without a push while the job is active, so a
lost push is recovered even when nothing follows it; a push that overtook an earlier one
is held up to CAO_FOLLOW_REORDER_WAIT_S for it, then the log fills the gap. When the channel layer fails (Redis
restarting), the socket stays open: it keeps streaming from the log and
rejoins the group once Redis answers again.

Close codes (the connection is accepted first so the code reaches the client):
4400 malformed ``after``, 4401 missing, invalid or expired credentials,
4404 unknown job, or a path that is not ``/ws/<job_id>``.
"""

import asyncio
from urllib.parse import parse_qs

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.utils import timezone

from common.origins import scope_origin_allowed
from jobs import selectors
from jobs.errors import JobNotFound
from jobs.follow import EventFollower, PushInbox
from jobs.live_reads import live_read
from jobs.monitor import token_allows
from jobs.permissions import may_read_jobs

# With no timer due (resyncs off, the job done), how often the tick looks again.
IDLE_TICK_S = 60.0

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def __call__(self, scope, receive, send):
        # Channels' own loop ends the socket when the channel layer's receive
        # raises (Redis restarting). This one keeps the socket: the inbox
        # waits layer errors out, and a resync tick reads the log meanwhile.
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.base_send = send
        self.inbox = PushInbox(self.channel_layer)
        self.job_id, self.follower = None, None
        self._timers_changed = asyncio.Event()
        try:
            await await_many_dispatch([receive, self.inbox.receive, self._tick], self.dispatch)
        except StopConsumer:
            pass

    async def _tick(self):
        """The follower's timers as messages: a held push's gap to read from the log, a resync after silence."""
        while True:
            follower = self.follower
            waits = (follower.gap_wait_s(), follower.resync_wait_s()) if follower else ()
            self._timers_changed.clear()
            try:
                # A follower that starts, or a push that opens a gap, wakes this up to wait for that instead.
                await asyncio.wait_for(
                    self._timers_changed.wait(), timeout=min((w for w in waits if w is not None), default=IDLE_TICK_S)
                )
                continue
            except asyncio.TimeoutError:
                pass
            if follower is not None and follower.gap_wait_s() == 0:
                return {"type": "job.gap"}
            if follower is not None and follower.resync_wait_s() == 0:
                return {"type": "job.resync"}

    async def connect(self):
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        await self.accept()
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        token = (query.get("token") or [""])[0]
        try:
            after = int((query.get("after") or ["0"])[0])
            if after < 0:
                raise ValueError
        except ValueError:
            after = None
        # One read for both: who may watch, then the job.
        refusal, job = await live_read(self._open)(token, after)
        if refusal is not None:
            await self.close(code=refusal)
            return
        self.job_id = str(job.id)
        follower = EventFollower(self.job_id, after=after, inbox=self.inbox, on_gap=self._timers_changed.set)
        await self.send_json(
            {
                "type": "WS_CONNECTED",
                "job_id": self.job_id,
                "ts": timezone.now().isoformat(),
                "status": job.status,
                "current_step_index": job.current_step_index,
                "total_steps": job.total_steps,
                "steps": job.steps,
                "last_seq": job.last_event_seq,
                "replay_after": after,
            }
        )
        await self._forward(follower.replay())
        # Set once the replay is sent: pushes and ticks wait for it.
        self.follower = follower
        self._timers_changed.set()

    async def disconnect(self, code):
        await self.inbox.leave()

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == "ping" and self.follower:
            # Answer with what the log holds, not just what was pushed: a
            # client pinging after a silence learns of a lost final push.
            await self._forward(self.follower.resync())
            await self.send_json({"type": "pong", "last_seq": self.follower.last_seq})

    async def job_events(self, message):
        """Live events pushed after commit (``jobs.publisher``)."""
        if self.follower:
            await self._forward(self.follower.pushed(message["events"]))

    async def job_resync(self, message):
        """The periodic tick: rejoin the group (Redis may have lost it), then read the log."""
        await self._forward(self.follower.resync(rejoin=True))

    async def job_gap(self, message):
        """A held push waited long enough for the ones it overtook: read them from the log."""
        if self.follower:
            await self._forward(self.follower.fill_gap())

    async def _forward(self, events):
        async for event in events:
            await self.send_json(event)

    def _open(self, token, after):
        """(the close code refusing the socket, or None; the job when it may be watched): one trip to a thread."""
        if not self._may_watch(token):
            return CLOSE_UNAUTHORIZED, None
        if after is None:
            return CLOSE_BAD_REQUEST, None
        try:
            return None, selectors.job_get(self.job_id, is_staff=True)
        except JobNotFound:
            return CLOSE_NOT_FOUND, None

    def _may_watch(self, token):
        """The job's monitor token, or a staff session allowed to read jobs (runs in a thread: it queries)."""
        return token_allows(token, self.job_id) or self._is_staff_from_allowed_origin()

    def _is_staff_from_allowed_origin(self):
        # A session cookie rides along with any page's WebSocket, whatever its
        # port or scheme: accept it only from our own origin (cross-site
        # WebSocket hijacking), and only for users the admin lets read jobs.
        return scope_origin_allowed(self.scope) and may_read_jobs(self.scope.get("user"))


class UnknownRouteConsumer(AsyncWebsocketConsumer):
    """Any WebSocket path other than ``/ws/<job_id>``: accepted, then closed with 4404."""

    async def connect(self):
        await self.accept()
        await self.close(code=CLOSE_NOT_FOUND)
