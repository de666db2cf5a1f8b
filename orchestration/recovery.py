"""Recovery in seconds: the scheduler's tick notices dead processes and Redis data loss.

Maintenance (orchestration.maintenance) runs every
SANITY_CHECK_INTERVAL_SECONDS and needs its grace periods to tell a lost
message from a slow one. Two faults can be known for certain, and sooner:

- **A process died.** Its heartbeat lapsed (orchestration.liveness), or a
  process starting on its host saw that its PID is gone. Its slots are
  reclaimed at once, its running attempts recorded LOST and retried, and the
  broker messages it had fetched go back to their queues.
- **Redis lost its data.** Its run_id changed (a restart, also from a
  snapshot, or a failover). Every queued step whose message vanished and
  every waiting step whose place vanished is re-sent at once.

Each tick costs one Redis round trip (the liveness check) plus a reap of
every service's expired leases, so a lapsed lease or reservation reaches the
next waiter within a tick too. Between ticks the scheduler waits on a list
that a starting worker pushes to, so a restart triggers a pass at once.
"""

import logging
import time
from dataclasses import dataclass, field

import dramatiq
from django.conf import settings
from django.db import transaction
from dramatiq.brokers.redis import RedisBroker

from jobs.models import Job, StepState
from orchestration.slots import send_handoffs
from orchestration.messages import parse_member
from orchestration.per_process import get_limiter, get_liveness
from orchestration.maintenance import (
    MaintenanceReport,
    mark_attempt_lost,
    return_messages_of_dead_workers,
    run_maintenance,
)
from common.row_cache import cached
from services_registry.selectors import service_list

logger = logging.getLogger(__name__)


@dataclass
class TickReport:
    """What one tick found and did."""

    redis_restarted: bool = False
    dead_processes: list = field(default_factory=list)
    reclaimed_slots: int = 0
    lost_attempts: int = 0
    maintenance: MaintenanceReport | None = None


class Recovery:
    """The scheduler's fast loop. One instance per scheduler process; ``tick`` is not thread-safe."""

    def __init__(self, *, clock=time.monotonic):
        self.clock = clock
        self.run_id = None
        # After a Redis restart from a snapshot, heartbeats restored from the
        # snapshot look lapsed until their processes beat again: no process
        # is declared dead from them until then.
        self.trust_heartbeats_after = 0.0

    def tick(self, *, full_pass=False):
        """Check liveness and Redis; repair what they say. ``full_pass`` runs maintenance too."""
        report = TickReport()
        liveness = get_liveness()
        run_id, dead = liveness.check()
        if self.run_id is not None and run_id != self.run_id:
            report.redis_restarted = True
            self.trust_heartbeats_after = self.clock() + settings.CAO_WORKER_DEAD_AFTER_S + 2 * settings.CAO_WORKER_HEARTBEAT_S
            logger.warning("Redis restarted or lost its data (run %s -> %s): re-sending what it lost.", self.run_id, run_id)
        self.run_id = run_id
        if dead and self.clock() >= self.trust_heartbeats_after:
            self.recover_dead(dead, report)
        if report.redis_restarted or full_pass:
            report.maintenance = run_maintenance(after_redis_loss=report.redis_restarted)
        else:
            # Leases that lapsed since the last tick (a timed-out call's hold,
            # a dead holder without a heartbeat) reach their waiters now.
            send_handoffs(get_limiter().redispatch_many(self._services()))
        return report

    def _services(self):
        # As fresh as the engine's own view (CAO_REGISTRY_CACHE_S): a
        # limit lowered in the admin must not be pumped at its old value.
        return cached(
            ("service_limits",), lambda: [(service.name, service.concurrency_limit) for service in service_list()]
        )

    def recover_dead(self, identities, report):
        """Give back the slots, steps and messages of processes known to be dead."""
        ids = [identity.id for identity in identities]
        report.dead_processes.extend(ids)
        logger.warning(
            "Process(es) %s stopped beating; reclaiming their slots and re-running their steps.",
            ", ".join(f"{identity.host}:{identity.pid}" for identity in identities),
        )
        _return_broker_messages(identities)
        limiter = get_limiter()
        for service in service_list():
            released, handoffs = limiter.reclaim(service.name, ids, limit=service.concurrency_limit)
            report.reclaimed_slots += len(released)
            send_handoffs(handoffs)
            for member in released:
                report.lost_attempts += _mark_lost(member, service)
        get_liveness().forget(ids)


def _return_broker_messages(identities):
    broker = dramatiq.get_broker()
    broker_ids = [identity.broker_id for identity in identities if identity.broker_id]
    if not isinstance(broker, RedisBroker) or not broker_ids:
        return
    # Age their broker heartbeat past any timeout, then sweep: Dramatiq puts
    # the messages they had fetched back on their queues.
    broker.client.zadd(f"{broker.namespace}:__heartbeats__", {broker_id: 0 for broker_id in broker_ids}, xx=True)
    return_messages_of_dead_workers()


def _mark_lost(member, service):
    step = parse_member(member)
    if step is None:
        return 0
    job_id, step_index, token = step
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or (job.current_step_index, job.step_token, job.step_state) != (
            step_index, token, StepState.RUNNING,
        ):
            return 0  # recorded, or already recovered, since
        mark_attempt_lost(job, service)
    return 1
