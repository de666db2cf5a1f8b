"""Dramatiq middleware of the gateway's workers."""

import logging

from django.conf import settings
from dramatiq.middleware import Middleware

from common.backends import require_backends

logger = logging.getLogger(__name__)


class RequireBackends(Middleware):
    """Stops a worker at boot, with a clear message, when PostgreSQL or Redis is unreachable."""

    def before_worker_boot(self, broker, worker):
        if settings.CAO_CHECK_BACKENDS_ON_START:
            require_backends()


class AnnounceWorker(Middleware):
    """A worker that starts tells the scheduler, and declares its host's dead processes.

    A worker restarted after a crash knows, on its own host, that its
    predecessor's PID is gone: its slots and steps are recovered at once
    instead of when its heartbeat lapses (orchestration.liveness).
    """

    def after_worker_boot(self, broker, worker):
        from orchestration.per_process import get_liveness

        try:
            liveness = get_liveness()
            dead = liveness.declare_dead_on_this_host()
            liveness.wake_scheduler("worker started" + (f"; {len(dead)} dead process(es) on its host" if dead else ""))
        except Exception:
            logger.warning("Could not announce this worker to the scheduler.", exc_info=True)

    def after_worker_shutdown(self, broker, worker):
        from orchestration.per_process import get_identity, get_liveness

        try:
            get_liveness().retire(get_identity())
        except Exception:
            pass  # its entry lapses by itself, and a lapsed entry without leases costs nothing
