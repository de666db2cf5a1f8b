"""Dramatiq middleware of the gateway's workers."""

from django.conf import settings
from dramatiq.middleware import Middleware

from cao_project.backends import require_backends


class RequireBackends(Middleware):
    """Stops a worker at boot, with a clear message, when PostgreSQL or Redis is unreachable."""

    def before_worker_boot(self, broker, worker):
        if settings.CAO_CHECK_BACKENDS_ON_START:
            require_backends()
