"""Who may open a job's event stream, and where it resumes: answered as the job API answers.

``JobStreamGate`` is a DRF view with the job API's authentication,
permission, throttle and exception handler, so every refusal (401, 403,
404, 429, 503) is the one the job API gives, in its error shape. It also
takes a monitor token in ``?token=`` (``jobs.monitor``): a browser's
EventSource cannot send headers. Not routed: ``jobs.sse`` runs it before a
stream starts, in Django's database thread.
"""

import re

from rest_framework import authentication, exceptions
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import BaseContentNegotiation
from rest_framework.response import Response
from rest_framework.views import APIView

from api_keys.authentication import ApiKeyAuthentication, IsApiClient, caller_scope
from api_keys.throttling import ClientRateThrottle
from common.errors import InvalidInput
from jobs import selectors
from jobs.monitor import token_allows
from jobs.permissions import READ_JOBS

# Seqs are PostgreSQL integers.
MAX_SEQ = 2**31 - 1
SEQ = re.compile(r"[0-9]{1,10}")


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
    """Whether and where a stream may start: 200 with ``{job_id, after}``, 204 when nothing is left, or an error."""

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
        end = selectors.finishing_seq(job)
        if end is not None and after >= end:
            return Response(status=204)
        return Response({"job_id": str(job.id), "after": after})
