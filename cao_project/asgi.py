"""ASGI entry point: HTTP through Django, WebSocket through Channels."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cao_project.settings")
# Requests run in changing threads under ASGI: one connection per request,
# closed at its end, instead of persistent ones that would pile up.
os.environ.setdefault("CAO_DB_CONN_MAX_AGE", "0")

# Initialise Django (and the app registry) before importing anything that
# touches models.
django_application = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from cao_project.backends import require_backends  # noqa: E402
from jobs.routing import websocket_urlpatterns  # noqa: E402

if settings.CAO_CHECK_BACKENDS_ON_START:
    require_backends()

application = ProtocolTypeRouter(
    {
        "http": django_application,
        # Sessions let staff watch jobs from the web pages; API clients use
        # the monitor token in monitor_url instead (checked by the consumer).
        "websocket": AuthMiddlewareStack(URLRouter(websocket_urlpatterns)),
    }
)
