"""ASGI middleware: bound request bodies before anything buffers them.

Under a WSGI handler a body without Content-Length (chunked) would read as
empty, and an oversized one would be buffered whole. This reads such a body
up to CAO_MAX_BODY_BYTES, answers 413 beyond it, and hands the app the body
with its Content-Length. Declared lengths over the limit are refused before
a byte is read.
"""

import json

from django.conf import settings

from common.errors import payload_too_large_body


class RequestBodyLimit:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = settings.CAO_MAX_BODY_BYTES
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if declared.isdigit() and int(declared) > limit:
                return await _refuse(send, int(declared), limit)
            return await self.app(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > limit:
                return await _refuse(send, len(body), limit)
            if not message.get("more_body"):
                break
        headers = [(name, value) for name, value in scope["headers"] if name != b"transfer-encoding"]
        headers.append((b"content-length", str(len(body)).encode()))
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(dict(scope, headers=headers), replay, send)


async def _refuse(send, size, limit):
    payload = json.dumps(payload_too_large_body(size, limit)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": payload})
