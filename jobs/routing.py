from django.urls import re_path

from jobs.consumers import JobProgressConsumer, UnknownRouteConsumer

websocket_urlpatterns = [
    re_path(r"^ws/(?P<job_id>[^/]+)/?$", JobProgressConsumer.as_asgi()),
    # Anything else gets a close code, not a server error.
    re_path(r"", UnknownRouteConsumer.as_asgi()),
]
