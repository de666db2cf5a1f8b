"""drf-spectacular hook: the event stream in the OpenAPI schema.

``GET /api/v1/jobs/{job_id}/stream`` is an async Django view (``jobs.sse``),
not a DRF one, so the generator does not see it; this hook adds the
operation as it behaves. Listed before ``common.openapi.add_error_responses``
in POSTPROCESSING_HOOKS, which then adds the statuses every job operation
shares (403, 429) without replacing the ones described here.
"""

import copy

from jobs.sse import RETRY_MS
from jobs.stream_gate import MAX_SEQ

PATH = "/api/v1/jobs/{job_id}/stream"
# The operation is listed right after this one.
AFTER_PATH = "/api/v1/jobs/{job_id}/events"

SEQ_SCHEMA = {"type": "integer", "minimum": 0, "maximum": MAX_SEQ}


def _error(description):
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


OPERATION = {
    "operationId": "jobs_stream_retrieve",
    "summary": "Stream a job's events (Server-Sent Events)",
    "description": (
        "The job's stored events after the resume point, then live ones, as `text/event-stream`: "
        "each event is `id: <seq>`, `event: <type>`, `data: <the event JSON, as the WebSocket sends it>`. "
        f"The stream starts with `retry: {RETRY_MS}`, sends `: keep-alive` after CAO_SSE_KEEPALIVE_S "
        "of silence, and ends after the event that finishes the job (JOB_COMPLETED, JOB_CANCELLED, or a "
        "JOB_ERROR the job was not resumed from). A browser's EventSource, which cannot send headers, "
        "authenticates with `?token=` (the token in `monitor_url`) and resumes with `Last-Event-ID` by itself."
    ),
    "tags": ["jobs"],
    "parameters": [
        {"in": "path", "name": "job_id", "required": True, "schema": {"type": "string"}},
        {
            "in": "header",
            "name": "Last-Event-ID",
            "required": False,
            "schema": SEQ_SCHEMA,
            "description": "Resume after this seq (an EventSource sends it when it reconnects). Wins over `after`.",
        },
        {
            "in": "query",
            "name": "after",
            "required": False,
            "schema": {**SEQ_SCHEMA, "default": 0},
            "description": "Resume after this seq, for clients that cannot send Last-Event-ID.",
        },
        {
            "in": "query",
            "name": "token",
            "required": False,
            "schema": {"type": "string"},
            "description": "The job's monitor token (from `monitor_url`), instead of an API key; "
            "an API key, when sent too, is used instead.",
        },
    ],
    "security": [{"ApiKeyAuth": []}, {"cookieAuth": []}, {}],
    "responses": {
        "200": {
            "description": "The event stream; it ends after the event that finishes the job.",
            "content": {
                "text/event-stream": {
                    "schema": {"type": "string"},
                    "example": 'retry: 3000\n\nid: 1\nevent: STEP_STARTED\ndata: {"type": "STEP_STARTED", "seq": 1, ...}\n\n',
                }
            },
        },
        "204": {"description": "Nothing left to stream: the job is finished and the resume point is at or after its last event."},
        "400": _error("`after` or `Last-Event-ID` is not a seq (a whole number, 0 or more)."),
        "401": _error("Missing or invalid API key, or an invalid or expired monitor token (or one for another job)."),
        "404": _error("No such job (or not yours)."),
        "503": _error("PostgreSQL cannot serve the request; see Retry-After."),
    },
}


def add_job_stream(result, generator, request, public):
    """POSTPROCESSING_HOOKS entry: adds the stream operation after the events one."""
    paths = result.setdefault("paths", {})
    operation = {"get": copy.deepcopy(OPERATION)}
    if AFTER_PATH not in paths:
        paths[PATH] = operation
        return result
    result["paths"] = {}
    for path, item in paths.items():
        result["paths"][path] = item
        if path == AFTER_PATH:
            result["paths"][PATH] = operation
    return result
