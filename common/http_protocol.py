"""The API server's HTTP/1.1 protocol: uvicorn's h11 one, refusing oversized request heads with 431.

uvicorn's default parser (httptools) puts no limit on a request's head: a
128 MB header was read for 31 s, during which every other request of the
process waited (20 s for a health check), and the process grew by 260 MB.
h11 bounds what it buffers before a head is complete; this protocol sets
that bound to CAO_MAX_HEADER_BYTES (the request line and headers together),
also refuses a complete head over it, and answers 431 in the API's error
shape at once, then closes the connection. uvicorn would answer every
parse error 400; other parse errors still are.

Selected with ``uvicorn --http common.http_protocol:H11Protocol``
(scripts/stack.py and docker-entrypoint.sh do).
"""

import json

import h11
from django.conf import settings
from uvicorn.protocols.http.h11_impl import H11Protocol as UvicornH11Protocol

from common.errors import error_body

# "GET " + target + " HTTP/1.1\r\n", then "name: value\r\n" per header, then "\r\n".
_REQUEST_LINE_OVERHEAD = len(b"  HTTP/1.1\r\n")
_HEADER_OVERHEAD = len(b": \r\n")


def head_size(request):
    """Bytes of an ``h11.Request``'s head as it came on the wire (give or take optional spaces)."""
    line = len(request.method) + len(request.target) + _REQUEST_LINE_OVERHEAD
    return line + sum(len(name) + len(value) + _HEADER_OVERHEAD for name, value in request.headers) + 2


class _Connection(h11.Connection):
    """An h11 server connection that refuses heads over its limit and remembers the status to answer."""

    error_status = 400

    def __init__(self, *, max_head_bytes):
        super().__init__(h11.SERVER, max_incomplete_event_size=max_head_bytes)
        self.max_head_bytes = max_head_bytes

    def next_event(self):
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as error:
            self.error_status = error.error_status_hint
            raise
        # h11 bounds the bytes of a head still incomplete; one that arrived
        # whole in a single read can be longer.
        if isinstance(event, h11.Request) and head_size(event) > self.max_head_bytes:
            self.error_status = 431
            raise h11.RemoteProtocolError("Request head too large", error_status_hint=431)
        return event


class H11Protocol(UvicornH11Protocol):
    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        self.max_head_bytes = settings.CAO_MAX_HEADER_BYTES
        self.conn = _Connection(max_head_bytes=self.max_head_bytes)

    def send_400_response(self, msg):
        # uvicorn's answer to every request h11 cannot parse.
        if self.conn.error_status != 431:
            return super().send_400_response(msg)
        body = json.dumps(
            error_body(
                "HEADERS_TOO_LARGE",
                f"The request line and headers exceed {self.max_head_bytes} bytes.",
                {"limit_bytes": self.max_head_bytes},
            )
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        for event in (
            h11.Response(status_code=431, headers=headers, reason=b"Request Header Fields Too Large"),
            h11.Data(data=body),
            h11.EndOfMessage(),
        ):
            self.transport.write(self.conn.send(event))
        self.transport.close()
