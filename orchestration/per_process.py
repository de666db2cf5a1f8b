"""The objects each process holds one of: limiter, liveness, identity, lease keeper.

Fork-aware: a forked worker process builds its own (its parent's keeper
thread does not exist in the child).
"""

import os
import threading

import dramatiq
from django.conf import settings
from dramatiq.brokers.redis import RedisBroker

from common.redis import get_redis
from orchestration.lease_keeper import LeaseKeeper
from orchestration.limiter import Limiter
from orchestration.liveness import Liveness, ProcessHeartbeat, ProcessIdentity

_lock = threading.RLock()  # factories may build other singletons
_state = {}


def _per_process(name, factory):
    key = (name, os.getpid())
    value = _state.get(key)
    if value is None:
        with _lock:
            value = _state.get(key)
            if value is None:
                value = _state[key] = factory()
    return value


def get_limiter():
    return _per_process(
        "limiter", lambda: Limiter(get_redis(), grant_ttl_s=settings.CAO_HANDOFF_TTL_S)
    )


def get_liveness():
    return _per_process("liveness", lambda: Liveness(get_redis()))


def get_identity():
    """Who this process is (a new identity in each forked child)."""

    def identify():
        broker = dramatiq.get_broker()
        return ProcessIdentity.current(broker_id=broker.broker_id if isinstance(broker, RedisBroker) else None)

    return _per_process("identity", identify)


def get_keeper():
    def build():
        heartbeat = ProcessHeartbeat(
            get_liveness(),
            get_identity(),
            period_s=settings.CAO_WORKER_HEARTBEAT_S,
            dead_after_s=settings.CAO_WORKER_DEAD_AFTER_S,
        )
        return LeaseKeeper(get_limiter(), heartbeat=heartbeat)

    return _per_process("keeper", build)
