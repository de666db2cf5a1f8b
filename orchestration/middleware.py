"""Dramatiq middleware of the gateway's workers."""

import logging
import queue

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


# How long an idle worker thread waits for a message before it looks again.
# Dramatiq's own wait is its worker_timeout (1 s), for one reason: to notice
# that the worker is stopping. QuietIdleThreads tells them instead.
IDLE_WAIT_S = 60.0


class QuietIdleThreads(Middleware):
    """Idle worker threads wait for a message without waking every second.

    Each of Dramatiq's worker threads waits on the work queue for at most
    ``worker_timeout`` (1 s), then checks whether the worker is stopping and
    waits again. In a green worker of 400 greenlets that is 400 wake-ups a
    second, most of its CPU while idle. Here they wait up to ``IDLE_WAIT_S``,
    and a stopping worker wakes them all at once.
    """

    def before_worker_boot(self, broker, worker):
        # Before the threads and consumers that share it are made.
        worker.work_queue = IdleWorkQueue(IDLE_WAIT_S)

    def before_worker_shutdown(self, broker, worker):
        # Worker.stop does this next; here first, so the threads woken below exit.
        for thread in worker.workers:
            thread.stop()
        worker.work_queue.wake_idle(len(worker.workers))


class _Wake:
    """What wakes an idle taker: ahead of every item in a priority queue, never handed out."""

    def __lt__(self, other):
        return True

    def __gt__(self, other):
        return False


_WAKE = _Wake()


class IdleWorkQueue(queue.PriorityQueue):
    """A work queue whose takers wait up to ``idle_wait_s`` (at least their own timeout), until woken.

    ``queue.PriorityQueue`` is gevent's in a green worker (monkey-patched
    before this module loads), the standard library's otherwise; both are
    woken the same way, by items that jump the queue.
    """

    def __init__(self, idle_wait_s):
        super().__init__()
        self.idle_wait_s = idle_wait_s
        self.woken = False

    def get(self, block=True, timeout=None):
        if block and timeout is not None and not self.woken:
            timeout = max(timeout, self.idle_wait_s)
        while True:
            item = super().get(block, timeout)
            if item is not _WAKE:
                return item
            self.task_done()
            if block:
                raise queue.Empty  # woken: its thread looks whether it should stop

    def wake_idle(self, takers):
        """Up to ``takers`` waiting takers return now (``queue.Empty``), and none waits long again."""
        self.woken = True
        for _ in range(takers):
            self.put(_WAKE)
