"""ASGI: long-lived streaming views run on Django's ASGI handler, holding no thread while they wait.

Every other request goes through the WSGI handler on a fixed pool of
threads (``cao_project.asgi``): a stream served there would hold one of
those threads, and its database connection, for as long as it is open.

Django's own ASGI handler is no better as it stands: it gives each request
a thread of its own for the request's synchronous parts (middleware,
``sync_to_async`` calls), kept until the response ends, so an idle stream
would still hold a parked thread and the connection opened in it. Without
that per-request context, asgiref runs thread-sensitive code on its one
process-wide thread, as Channels consumers do: a stream's middleware,
authentication and log reads take turns there and return at once, and
while it waits the stream is only a coroutine.
"""

from django.core.handlers.asgi import ASGIHandler


class StreamingASGIHandler(ASGIHandler):
    """Django's ASGI handler without a thread per request; for async views that stream."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


class StreamRouter:
    """Sends HTTP requests whose path matches ``paths`` (a compiled regex) to ``streams``, the rest to ``app``."""

    def __init__(self, app, *, streams, paths):
        self.app = app
        self.streams = streams
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.paths.fullmatch(scope["path"]):
            return await self.streams(scope, receive, send)
        return await self.app(scope, receive, send)
