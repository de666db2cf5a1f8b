"""The process-wide limiter and lease keeper, and how leases are named.

A lease is named after the step message that holds it (job, step, token):
a stale or duplicate message can then never release the slot of the
attempt that is really running.
"""

import json
import os
import threading

from django.conf import settings

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from common.redis import get_redis
from jobs.outcomes import StepDispatch
from orchestration.limiter import LeaseKeeper, Limiter
from orchestration.liveness import Liveness, ProcessHeartbeat, ProcessIdentity

_lock = threading.RLock()  # factories may build other singletons
_state = {}


def lease_member(job_id, step_index, token):
    return f"{job_id}:{step_index}:{token}"


def step_member(step):
    """The lease of a step message (``StepDispatch``)."""
    return lease_member(step.job_id, step.step_index, step.token)


def parse_member(member):
    """``(job_id, step_index, token)`` of a lease member, or None if it is not a step's."""
    try:
        job_id, step_index, token = member.rsplit(":", 2)
        return job_id, int(step_index), int(token)
    except (AttributeError, ValueError):
        return None


def handoff_payload(dispatch):
    """What a parked step leaves with the limiter: the message to send on hand-off."""
    return json.dumps([str(dispatch.job_id), dispatch.step_index, dispatch.token, dispatch.service])


def parse_handoff(payload):
    job_id, step_index, token, service = json.loads(payload)
    return StepDispatch(job_id, step_index, token, service)


def _per_process(name, factory):
    # Fork-aware: a forked worker process builds its own (its parent's
    # keeper thread does not exist in the child).
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
