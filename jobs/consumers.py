"""``/ws/<job_id>``: a job's events, replayed from the log and then live.

On connect: authenticate (the monitor token of that job, or a staff session
from an allowed origin), join the job's group, send ``WS_CONNECTED`` with a
snapshot, replay stored events after ``?after=<seq>``, then forward live
ones. Joining the group *before* reading the log is what closes the race:
an event committed before the read is in the log, one committed after it is
pushed to the group. Duplicates (seq already sent) are dropped, and a gap
(a push lost or overtaken) is filled from the log, so the client sees every
seq exactly once, in order.

Close codes (the connection is accepted first so the code reaches the client):
4400 malformed ``after``, 4401 missing, invalid or expired credentials,
4404 unknown job.
"""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
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


class JobProgressConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        self.job_id = self.scope["url_route"]["kwargs"]["job_id"]
        self.group = None
        self.last_seq = 0
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
        await self.channel_layer.group_add(self.group, self.channel_name)
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
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong", "last_seq": self.last_seq})

    async def job_events(self, message):
        """Live events pushed after commit (``jobs.publisher``)."""
        for event in message["events"]:
            seq = event["seq"]
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1:
                await self._send_from_log(up_to=seq - 1)
            await self.send_json(event)
            self.last_seq = seq

    async def _send_from_log(self, *, up_to):
        while True:
            events = await database_sync_to_async(selectors.job_events)(
                self.job_id, after=self.last_seq, through=up_to, limit=REPLAY_BATCH
            )
            for event in events:
                await self.send_json(event)
                self.last_seq = event["seq"]
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
