"""The scheduler (compose service `beat`): recovery every tick, maintenance every interval.

Every CAO_RECOVERY_TICK_S (1 s) the leader checks for dead processes and a
Redis restart (orchestration.recovery); every SANITY_CHECK_INTERVAL_SECONDS
it runs the full maintenance pass. Between ticks it waits on a wake-up list:
a worker that starts asks for a pass at once.
"""

import logging
import signal
import threading
import time
import uuid

import redis
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from common.backends import require_backends
from common.redis import get_redis
from orchestration.per_process import get_liveness
from orchestration.maintenance import run_maintenance
from orchestration.recovery import Recovery

logger = logging.getLogger("orchestration.scheduler")

LOCK_KEY = "cao:scheduler:leader"
# Take the lock, or extend it if this scheduler already holds it, in one
# atomic step: a GET then PEXPIRE could extend a lock that expired, and was
# taken by the standby, between the two.
LEAD_SCRIPT = """
if redis.call("set", KEYS[1], ARGV[1], "NX", "PX", ARGV[2]) then
    return 1
end
if redis.call("get", KEYS[1]) == ARGV[1] then
    redis.call("pexpire", KEYS[1], ARGV[2])
    return 1
end
return 0
"""


class Command(BaseCommand):
    help = "Run recovery and periodic maintenance (dead workers, Redis restarts, stuck jobs, lost messages) until stopped."

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
            close_old_connections()
            self._log(run_maintenance())
            return
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        identity = uuid.uuid4().hex
        tick_s = settings.CAO_RECOVERY_TICK_S
        logger.info("Scheduler %s started; recovery every %.1f s, maintenance every %.1f s.", identity[:8], tick_s, interval)
        recovery = Recovery()
        next_pass = 0.0
        wake = "start"
        failing = False
        while not stop.is_set():
            try:
                if self._lead(identity, ttl_s=max(5.0, 3 * tick_s)):
                    # A long-lived process must drop connections a PostgreSQL
                    # restart broke, as Django does between requests.
                    close_old_connections()
                    full = bool(wake) or time.monotonic() >= next_pass
                    report = recovery.tick(full_pass=full)
                    if full:
                        next_pass = time.monotonic() + interval
                    self._log_tick(report, wake)
                failing = False
                wake = get_liveness().wait_for_wake(tick_s)
            except (redis.ConnectionError, redis.TimeoutError):
                if not failing:
                    logger.warning("Redis is unavailable; recovery resumes when it is back.", exc_info=True)
                failing, wake = True, None
                stop.wait(tick_s)
            except Exception:
                logger.exception("Recovery tick failed; retrying at the next tick.")
                wake = None
                stop.wait(tick_s)
        logger.info("Scheduler %s stopped.", identity[:8])

    def _lead(self, identity, *, ttl_s):
        # One leader at a time does the work; a second scheduler stands by
        # and takes over when the leader's lock expires. (Two at once would
        # still be safe, only wasteful.)
        return bool(get_redis().eval(LEAD_SCRIPT, 1, LOCK_KEY, identity, int(ttl_s * 1000)))

    def _log_tick(self, report, wake):
        if wake and wake != "start":
            logger.info("Woken (%s): ran a recovery pass.", wake)
        if report.dead_processes:
            logger.warning(
                "Recovered %d dead process(es): %d slot(s) reclaimed, %d attempt(s) re-run.",
                len(report.dead_processes), report.reclaimed_slots, report.lost_attempts,
            )
        if report.maintenance:
            self._log(report.maintenance)

    def _log(self, report):
        if report.changed:
            logger.info(
                "Maintenance: reaped %d lease(s), handed off %d slot(s), removed %d orphan(s) from lines, "
                "failed %d stuck job(s) and %d past their deadline, re-sent %d step(s), "
                "recovered %d lost attempt(s), re-sent %d webhook delivery message(s).",
                report.reaped_leases, report.handed_off, report.orphans_removed, report.stuck_failed,
                report.deadline_failed, report.redispatched, report.lost_attempts, report.webhooks_redispatched,
            )
