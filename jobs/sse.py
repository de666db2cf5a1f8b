"""``GET /api/v1/jobs/<id>/stream``: a job's events as Server-Sent Events, replayed, then live.

Each event is ``id: <seq>``, ``event: <type>``, ``data: <the event JSON, as
the WebSocket sends it>``. The stream resumes after the ``Last-Event-ID``
header (a reconnecting EventSource sends it) or ``?after=<seq>``, and ends
after the event that finishes the job (``jobs.stream_end``); a client
already past that event gets 204 No Content, which tells an EventSource to
stop reconnecting. Following the job (join before reading the log, no
duplicates, gaps filled, resync, channel-layer errors outlasted) is
``jobs.follow``'s, as for the WebSocket.

Who may open a stream, and every refusal, is answered by a DRF view of the
job API's own making (``JobStreamGate``: its authentication, permission,
throttle and error handler), run before the stream starts; it also takes a
monitor token in ``?token=``, as a browser's EventSource cannot send
headers. The stream itself is an async view served by Django's ASGI handler
(``cao_project.asgi``): while it waits it holds neither a thread nor a
database connection.
"""

import asyncio
import json
import re
from contextlib import aclosing

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import DatabaseError
from django.http import StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt
from rest_framework import authentication, exceptions
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.response import Response
from rest_framework.views import APIView

from api_keys.authentication import ApiKeyAuthentication, IsApiClient, caller_scope
from api_keys.throttling import ClientRateThrottle
from common.errors import InvalidInput
from jobs import selectors
from jobs.follow import EventFollower, PushInbox, resync_interval
from jobs.monitor import token_allows
from jobs.permissions import READ_JOBS
from jobs.stream_end import ends_stream, finishing_seq

CONTENT_TYPE = "text/event-stream"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# How long an EventSource waits before reconnecting after the connection drops.
RETRY_MS = 3000
KEEP_ALIVE = ": keep-alive\n\n"
# Seqs are PostgreSQL integers.
MAX_SEQ = 2**31 - 1
SEQ = re.compile(r"[0-9]{1,10}")


def event_frame(event):
    """One event as the stream sends it; ``data`` is the JSON the WebSocket sends (one line: JSON escapes newlines)."""
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"


def resume_point(request):
    """The seq the stream resumes after: ``Last-Event-ID`` if sent, else ``?after``, else 0."""
    # An EventSource whose last id is empty sends no header; an empty one means the same.
    header = request.headers.get("Last-Event-ID", "")
    if header:
        return _seq("Last-Event-ID", header)
    if "after" in request.query_params:
        return _seq("after", request.query_params["after"])
    return 0


def _seq(name, value):
    if not SEQ.fullmatch(value) or int(value) > MAX_SEQ:
        raise InvalidInput(
            f"{name} must be the seq of an event: a whole number from 0 to {MAX_SEQ}.", details={name: "invalid"}
        )
    return int(value)


class JobWatcher:
    """Whoever holds a valid monitor token of one job: they may watch that job, nothing else."""

    is_authenticated = True

    def __init__(self, job_id):
        self.job_id = job_id


class MonitorTokenAuthentication(authentication.BaseAuthentication):
    """``?token=<monitor token>`` (``jobs.monitor``) for the job in the URL; a bad one is refused, not ignored."""

    def authenticate(self, request):
        token = request.query_params.get("token")
        if token is None:
            return None
        job_id = request.parser_context["kwargs"]["job_id"]
        if not token_allows(token, job_id):
            raise exceptions.AuthenticationFailed("Invalid or expired monitor token, or a token for another job.")
        return JobWatcher(job_id), token


class WatcherOrApiClient(IsApiClient):
    """A monitor token's holder, or whoever the job API lets in (with its messages)."""

    def has_permission(self, request, view):
        return isinstance(request.user, JobWatcher) or super().has_permission(request, view)


class StreamThrottle(ClientRateThrottle):
    """The client budget of the job API; a token holder, who has no key of its own here, is counted by address."""

    def client_ident(self, request):
        if isinstance(request.user, JobWatcher):
            return f"ip:{self.get_ident(request)}"
        return super().client_ident(request)


class AlwaysJson(BaseContentNegotiation):
    """The gate's own answers (refusals) are JSON whatever ``Accept`` says: it asks for the stream, not for them."""

    def select_parser(self, request, parsers):
        return parsers[0] if parsers else None

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class JobStreamGate(APIView):
    """Whether and where a stream may start: 200 with ``{job_id, after}``, 204 when nothing is left, or an error.

    Not routed: ``job_event_stream`` runs it first, in Django's database thread.
    """

    # The job API's, with a token before the session: a credential the
    # client chose to send counts before the cookie a browser sends anyway.
    authentication_classes = [ApiKeyAuthentication, MonitorTokenAuthentication, SessionAuthentication]
    permission_classes = [WatcherOrApiClient]
    throttle_classes = [StreamThrottle]
    content_negotiation_class = AlwaysJson
    session_permissions = {"GET": READ_JOBS}
    http_method_names = ["get", "options"]

    def get(self, request, job_id):
        after = resume_point(request)
        if isinstance(request.user, JobWatcher):
            owner, is_staff = None, True  # the token names this very job
        else:
            owner, is_staff = caller_scope(request)
        job = selectors.job_get(job_id, owner=owner, is_staff=is_staff)
        end = finishing_seq(job)
        if end is not None and after >= end:
            return Response(status=204)
        return Response({"job_id": str(job.id), "after": after})


_gate = JobStreamGate.as_view()


@csrf_exempt  # the gate checks CSRF itself, for sessions, as DRF views do
async def job_event_stream(request, job_id):
    answer = await database_sync_to_async(_gate)(request, job_id=job_id)
    if request.method != "GET" or answer.status_code != 200:
        return answer
    stream = JobEventStream(answer.data["job_id"], after=answer.data["after"])
    return StreamingHttpResponse(stream.frames(), content_type=CONTENT_TYPE, headers=HEADERS)


class JobEventStream:
    """The frames of one job's stream from ``after``: replay, then live, until the event that finishes the job.

    Silent for CAO_SSE_KEEPALIVE_SECONDS, it sends a comment line, so proxies
    and clients see the connection is alive. Closed early (the client went
    away, which cancels it), it leaves the job's group on its way out.
    """

    def __init__(self, job_id, *, after, layer=None):
        self.job_id = job_id
        self.after = after
        self.layer = layer

    async def frames(self):
        layer = self.layer or get_channel_layer()
        inbox = PushInbox(layer, await layer.new_channel())
        follower = EventFollower(self.job_id, after=self.after, inbox=inbox)
        loop = asyncio.get_running_loop()
        receiving = None
        try:
            yield f"retry: {RETRY_MS}\n\n"
            source = follower.replay()
            receiving = asyncio.ensure_future(inbox.receive())
            interval = resync_interval()
            next_resync = loop.time() + interval if interval else float("inf")
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
                keep_alive = settings.CAO_SSE_KEEPALIVE_SECONDS
                next_keep_alive = last_write + keep_alive if keep_alive > 0 else float("inf")
                wake_at = min(next_resync, next_keep_alive)
                timeout = None if wake_at == float("inf") else max(wake_at - loop.time(), 0.0)
                done, _ = await asyncio.wait({receiving}, timeout=timeout)
                now = loop.time()
                if receiving in done:
                    source = follower.messages(receiving.result())
                    receiving = asyncio.ensure_future(inbox.receive())
                elif now >= next_resync:
                    interval = resync_interval()
                    next_resync = now + interval if interval else float("inf")
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
