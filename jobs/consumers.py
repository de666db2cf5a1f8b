"""``/ws/<job_id>``: a job's events, replayed from the log and then live.

On connect: authenticate (the monitor token of that job, or a staff session
from an allowed origin), join the job's group, send ``WS_CONNECTED`` with a
snapshot, replay stored events after ``?after=<seq>``, then forward live
ones. Joining the group *before* reading the log is what closes the race:
an event committed before the read is in the log, one committed after it is
pushed to the group. Duplicates (seq already sent) are dropped, and a gap
(a push lost or overtaken) is filled from the log, so the client sees every
seq exactly once, in order.

Pushes are only the fast path; the log is the truth. The consumer reads the
log again on every client ``ping`` (before it answers ``pong``) and every
CAO_WS_RESYNC_SECONDS while the job is active, so a lost push is recovered
even when nothing follows it (the final JOB_COMPLETED, say). When the
channel layer fails (Redis restarting), the socket stays open: it keeps
streaming from the log and rejoins the group once Redis answers again.

Close codes (the connection is accepted first so the code reaches the client):
4400 malformed ``after``, 4401 missing, invalid or expired credentials,
4404 unknown job, or a path that is not ``/ws/<job_id>``.
"""

import asyncio
import logging
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncJsonWebsocketConsumer, AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from channels.utils import await_many_dispatch
from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from common.origins import scope_origin_allowed
from jobs import selectors
from jobs.errors import JobNotFound
from jobs.monitor import token_allows
from jobs.permissions import may_read_jobs
from jobs.publisher import group_name

CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_NOT_FOUND = 4404

REPLAY_BATCH = 500
# Events after which the job emits nothing more (a FAILED job may be resumed).
FINAL_EVENTS = frozenset({"JOB_COMPLETED", "JOB_CANCELLED"})
# Waits between tries to reach a failing channel layer.
LAYER_RETRY_S = (0.5, 1.0, 2.0, 5.0)

logger = logging.getLogger(__name__)


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def __call__(self, scope, receive, send):
        # Channels' own loop ends the socket when the channel layer's receive
        # raises (Redis restarting). This one keeps the socket: layer errors
        # are retried, and a resync tick reads the log meanwhile.
        self.scope = scope
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        self.channel_name = await self.channel_layer.new_channel()
        self.base_send = send
        self.layer_failures = 0
        self.job_id, self.group, self.last_seq, self.finished = None, None, 0, False
        try:
            await await_many_dispatch([receive, self._receive_from_layer, self._resync_tick], self.dispatch)
        except StopConsumer:
            pass

    async def _receive_from_layer(self):
        while True:
            try:
                message = await self.channel_layer.receive(self.channel_name)
            except Exception:
                await self._layer_failed("receive")
                continue
            self.layer_failures = 0
            return message

    async def _layer_failed(self, operation):
        self.layer_failures += 1
        if self.layer_failures == 1:
            logger.warning("Channel layer %s failed for job %s; streaming from the log.", operation, self.job_id)
        await asyncio.sleep(LAYER_RETRY_S[min(self.layer_failures, len(LAYER_RETRY_S)) - 1])

    async def _resync_tick(self):
        while True:
            interval = settings.CAO_WS_RESYNC_SECONDS
            await asyncio.sleep(interval if interval > 0 else 60.0)
            if self.group and not self.finished and interval > 0:
                return {"type": "job.resync"}

    async def connect(self):
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        await self.accept()
        query = parse_qs(self.scope.get("query_string", b"").decode("latin1"))
        token = (query.get("token") or [""])[0]
        if not await database_sync_to_async(self._may_watch)(token):
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        try:
            self.last_seq = int((query.get("after") or ["0"])[0])
            if self.last_seq < 0:
                raise ValueError
        except ValueError:
            await self.close(code=CLOSE_BAD_REQUEST)
            return
        try:
            job = await database_sync_to_async(selectors.job_get)(self.job_id, is_staff=True)
        except JobNotFound:
            await self.close(code=CLOSE_NOT_FOUND)
            return
        self.job_id = str(job.id)
        self.group = group_name(self.job_id)
        await self._join_group()
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
                "replay_after": self.last_seq,
            }
        )
        await self._send_from_log(up_to=None)

    async def disconnect(self, code):
        if self.group:
            try:
                await self.channel_layer.group_discard(self.group, self.channel_name)
            except Exception:
                pass  # the membership expires by itself (channels-redis group_expiry)

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == "ping":
            # Answer with what the log holds, not just what was pushed: a
            # client pinging after a silence learns of a lost final push.
            await self._resync()
            await self.send_json({"type": "pong", "last_seq": self.last_seq})

    async def job_events(self, message):
        """Live events pushed after commit (``jobs.publisher``)."""
        for event in message["events"]:
            seq = event["seq"]
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1:
                await self._send_from_log(up_to=seq - 1)
            await self._send_event(event)

    async def job_resync(self, message):
        """The periodic tick: rejoin the group (Redis may have lost it), then read the log."""
        await self._join_group()
        await self._resync()

    async def _join_group(self):
        # Idempotent, and cheap: it also renews the membership's expiry.
        try:
            await self.channel_layer.group_add(self.group, self.channel_name)
        except Exception:
            logger.warning("Could not join the group of job %s; streaming from the log.", self.job_id)

    async def _resync(self):
        try:
            await self._send_from_log(up_to=None)
        except DatabaseError:
            logger.warning("Could not read the log of job %s; retrying at the next tick.", self.job_id)

    async def _send_event(self, event):
        await self.send_json(event)
        self.last_seq = event["seq"]
        if event.get("type") in FINAL_EVENTS:
            self.finished = True

    async def _send_from_log(self, *, up_to):
        while True:
            events = await database_sync_to_async(selectors.job_events)(
                self.job_id, after=self.last_seq, through=up_to, limit=REPLAY_BATCH
            )
            for event in events:
                await self._send_event(event)
            if len(events) < REPLAY_BATCH:
                return

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
