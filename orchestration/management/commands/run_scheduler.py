"""The scheduler (compose service `beat`): runs maintenance every SANITY_CHECK_INTERVAL_SECONDS."""

import logging
import signal
import threading
import uuid

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from cao_project.backends import require_backends
from common.redis import get_redis
from orchestration.maintenance import run_maintenance

logger = logging.getLogger("orchestration.scheduler")

LOCK_KEY = "cao:scheduler:leader"


class Command(BaseCommand):
    help = "Run periodic maintenance (stuck jobs, expired leases, lost messages) until stopped."

    def add_arguments(self, parser):
        parser.add_argument("--once", action="store_true", help="run one maintenance pass and exit")
        parser.add_argument(
            "--interval", type=float, default=None, help="seconds between passes (default SANITY_CHECK_INTERVAL_SECONDS)"
        )

    def handle(self, *args, once=False, interval=None, **options):
        if settings.CAO_CHECK_BACKENDS_ON_START:
            require_backends()
        interval = interval or settings.SANITY_CHECK_INTERVAL_SECONDS
        if once:
            self._pass()
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        identity = uuid.uuid4().hex
        logger.info("Scheduler %s started; maintenance every %.1f s.", identity[:8], interval)
        while not stop.is_set():
            # One leader at a time does the work; a second scheduler stands by
            # and takes over when the leader's lock expires. (Two passes at once
            # would still be safe, only wasteful.)
            try:
                if self._lead(identity, interval):
                    self._pass()
            except Exception:
                logger.exception("Maintenance pass failed; retrying at the next interval.")
            stop.wait(interval)
        logger.info("Scheduler %s stopped.", identity[:8])

    def _lead(self, identity, interval):
        redis = get_redis()
        ttl_ms = int(interval * 3 * 1000)
        if redis.set(LOCK_KEY, identity, nx=True, px=ttl_ms):
            return True
        if redis.get(LOCK_KEY) == identity:
            redis.pexpire(LOCK_KEY, ttl_ms)
            return True
        return False

    def _pass(self):
        # A long-lived process must drop connections a PostgreSQL restart
        # broke, as Django does between requests.
        close_old_connections()
        report = run_maintenance()
        if any((report.reaped_leases, report.handed_off, report.stuck_failed, report.redispatched, report.lost_attempts)):
            logger.info(
                "Maintenance: reaped %d lease(s), handed off %d slot(s), failed %d stuck job(s), "
                "re-sent %d step(s), recovered %d lost attempt(s).",
                report.reaped_leases, report.handed_off, report.stuck_failed, report.redispatched,
                report.lost_attempts,
            )
