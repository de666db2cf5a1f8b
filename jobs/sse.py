"""``GET /api/v1/jobs/<id>/stream``: a job's events as Server-Sent Events, replayed, then live.

Each event is ``id: <seq>``, ``event: <type>``, ``data: <the event JSON, as
the WebSocket sends it>``. The stream resumes after the ``Last-Event-ID``
header (a reconnecting EventSource sends it) or ``?after=<seq>``, and ends
after the event that finishes the job (``jobs.stream_end``); a client
already past that event gets 204 No Content, which tells an EventSource to
stop reconnecting. Following the job (join before reading the log, no
duplicates, gaps filled, resync, channel-layer errors outlasted) is
``jobs.follow``'s, as for the WebSocket.

Who may open a stream, where it resumes, and every refusal are answered
first by ``jobs.stream_gate`` (a DRF view made like the job API's). The
stream itself is an async view served by Django's ASGI handler
(``cao_project.asgi``): while it waits it holds neither a thread nor a
database connection.
"""

import asyncio
import json
from contextlib import aclosing

from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.http import StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from jobs.follow import EventFollower, PushInbox
from jobs.live_reads import live_read
from jobs.stream_end import ends_stream
from jobs.stream_gate import JobStreamGate

CONTENT_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How long an EventSource waits before reconnecting after the connection drops.
RETRY_MS = 3000
KEEP_ALIVE = ": keep-alive\n\n"


def event_frame(event):
    """One event as the stream sends it; ``data`` is the JSON the WebSocket sends (one line: JSON escapes newlines)."""
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


_gate = JobStreamGate.as_view()


@csrf_exempt  # the gate checks CSRF itself, for sessions, as DRF views do
async def job_event_stream(request, job_id):
    answer = await live_read(_gate)(request, job_id=job_id)
    if request.method != "GET" or answer.status_code != 200:
        return answer
    stream = JobEventStream(answer.data["job_id"], after=answer.data["after"])
    return StreamingHttpResponse(stream.frames(), content_type=CONTENT_TYPE, headers=HEADERS)


class JobEventStream:
    """The frames of one job's stream from ``after``: replay, then live, until the event that finishes the job.

    Silent for CAO_SSE_KEEPALIVE_S, it sends a comment line, so proxies
    and clients see the connection is alive. Closed early (the client went
    away, which cancels it), it leaves the job's group on its way out.
    """

    def __init__(self, job_id, *, after, layer=None):
        self.job_id = job_id
        self.after = after
        self.layer = layer

    async def frames(self):
        layer = self.layer or get_channel_layer()
        inbox = PushInbox(layer)
        follower = EventFollower(self.job_id, after=self.after, inbox=inbox)
        loop = asyncio.get_running_loop()
        receiving = None
        try:
            yield f"retry: {RETRY_MS}\n\n"
            source = follower.replay()
            receiving = asyncio.ensure_future(inbox.receive())
            last_write = loop.time()
            while True:
                if source is not None:
                    async with aclosing(source) as events:
                        async for event in events:
                            yield event_frame(event)
                            last_write = loop.time()
                            if await self._is_last(follower, event):
                                return
                    source = None
                keep_alive = settings.CAO_SSE_KEEPALIVE_S
                next_keep_alive = last_write + keep_alive if keep_alive > 0 else float("inf")
                timers = [loop.time() + wait_s for wait_s in (follower.gap_wait_s(), follower.resync_wait_s()) if wait_s is not None]
                wake_at = min([next_keep_alive, *timers])
                timeout = None if wake_at == float("inf") else max(wake_at - loop.time(), 0.0)
                done, _ = await asyncio.wait({receiving}, timeout=timeout)
                now = loop.time()
                if receiving in done:
                    source = follower.messages(receiving.result())
                    receiving = asyncio.ensure_future(inbox.receive())
                elif follower.gap_wait_s() == 0:
                    source = follower.fill_gap()
                elif follower.resync_wait_s() == 0:
                    source = follower.resync(rejoin=True)
                elif now >= next_keep_alive:
                    yield KEEP_ALIVE
                    last_write = now
        finally:
            if receiving is not None:
                receiving.cancel()
            await inbox.leave()

    async def _is_last(self, follower, event):
        if event["type"] != "JOB_ERROR":
            return ends_stream(event)
        # A failure ends the stream unless the job was already resumed.
        try:
            following = await follower.read_events(self.job_id, after=event["seq"], through=None, limit=1)
        except DatabaseError:
            following = []  # the client reconnects and learns the rest
        return ends_stream(event, following[0] if following else None)
