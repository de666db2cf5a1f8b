from django.urls import re_path

from jobs.consumers import JobProgressConsumer

websocket_urlpatterns = [
    re_path(r"^ws/(?P<job_id>[^/]+)/?$", JobProgressConsumer.as_asgi()),
]
