"""ASGI entry point: HTTP through Django on a fixed thread pool, WebSocket through Channels.

Every view but the event streams is synchronous. Served by Django's ASGI
handler, each request would run in a thread made for it (asgiref's
ThreadSensitiveContext), paying for the thread and, worse, for a new
PostgreSQL connection per request, as persistent connections cannot outlive
their thread. Through a2wsgi the WSGI handler runs on a fixed pool of
threads, each keeping its connection. The event streams (``STREAM_PATHS``,
async views that stay open while a job runs) go to Django's ASGI handler
instead, without a thread per request, so a waiting stream holds neither a
thread nor a connection (``common.asgi_streams``). Before both, header names
with underscores are dropped (they would alias hyphenated ones in the WSGI
environ) and bodies are bounded.
"""

import concurrent.futures
import os
import re

from a2wsgi import WSGIMiddleware
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cao_project.settings")

# Initialise Django (and the app registry) before importing anything that
# touches models.
django_application = get_wsgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from common.backends import require_backends  # noqa: E402
from common.asgi_body_limit import RequestBodyLimit  # noqa: E402
from common.asgi_headers import DropUnderscoreHeaders  # noqa: E402
from common.asgi_streams import StreamingASGIHandler, StreamRouter  # noqa: E402
from common.logs import SERVER_LOGGERS, redact_loggers  # noqa: E402
from jobs.routing import websocket_urlpatterns  # noqa: E402

# uvicorn configured its own loggers before Django's; their lines carry URLs
# (monitor tokens, keys sent as query parameters): mask them as ours are.
redact_loggers(*SERVER_LOGGERS)

if settings.CAO_CHECK_BACKENDS_ON_START:
    # In a thread: uvicorn's worker processes (--workers, WEB_CONCURRENCY)
    # import the app inside their event loop, where Django refuses queries.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as checker:
        checker.submit(require_backends).result()

# The paths of the async views (cao_project.urls): GET /api/v1/jobs/<id>/stream.
STREAM_PATHS = re.compile(r"/api/v1/jobs/[^/]+/stream")

application = ProtocolTypeRouter(
    {
        "http": DropUnderscoreHeaders(
            RequestBodyLimit(
                StreamRouter(
                    WSGIMiddleware(django_application, workers=settings.CAO_HTTP_THREADS),
                    streams=StreamingASGIHandler(),
                    paths=STREAM_PATHS,
                )
            )
        ),
        # Sessions let staff watch jobs from the web pages; API clients use
        # the monitor token in monitor_url instead (checked by the consumer).
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
