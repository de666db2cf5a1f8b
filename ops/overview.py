"""The live services overview: every service, queue and the last hour's jobs in one JSON-ready snapshot.

Read-only. Figures come from where they live: slots, lines, cool-downs,
circuits and rate budgets from the limiter (Redis), queue depths from the
broker, calls and latency from StepAttempt rows, jobs from Job and JobEvent
rows (PostgreSQL). Redis being down is shown as ``null`` figures with
``"unavailable"``, never raised: the page must still say what it can.
"""

import logging
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from redis.exceptions import RedisError

from ops.occupancy import read_occupancies
from ops.selectors import CallFigures, call_figures_by_service, jobs_per_minute
from orchestration.queues import queue_depths
from services_registry.selectors import service_list

logger = logging.getLogger(__name__)

CALLS_WINDOW = timedelta(minutes=5)
JOBS_WINDOW_MINUTES = 60


def service_state(occupancy, *, enabled, limit):
    """``(state, description)``: the one thing about a service ops should see first.

    Worst first: the limiter cannot be read, the service is switched off, its
    circuit is open (or probing), it cools down after a 429/503, its rate
    budget is spent, every slot is taken with steps waiting; else ``ok``.
    """
    if occupancy is None:
        return "unavailable", "the limiter (Redis) cannot be read"
    now = occupancy.now
    if not enabled:
        return "disabled", "disabled: no new step starts"
    if occupancy.circuit == "open":
        return "circuit-open", f"circuit open, probe in {_left(occupancy.probe_at, now):.1f} s"
    if occupancy.circuit == "probing":
        return "probing", "circuit open, one probe call let through"
    if occupancy.cooling_until and occupancy.cooling_until > now:
        return "cooling", f"cooling down {_left(occupancy.cooling_until, now):.1f} s"
    if occupancy.rate_frees_at and occupancy.rate_frees_at > now:
        return "budget-spent", f"rate budget spent, room in {_left(occupancy.rate_frees_at, now):.1f} s"
    if occupancy.in_use >= limit and occupancy.waiting:
        return "full", f"every slot taken, {occupancy.waiting} waiting"
    return "ok", "ok"


def _left(until, now):
    return max(0.0, (until or now) - now)


def _budget(used, limit):
    """``{"used", "limit"}``; ``limit`` is ``None`` when the service has no such budget."""
    return {"used": used, "limit": limit or None}


def service_row(service, occupancy, calls):
    state, description = service_state(occupancy, enabled=service.enabled, limit=service.concurrency_limit)
    row = {
        "name": service.name,
        "queue": service.queue,
        "enabled": service.enabled,
        "limit": service.concurrency_limit,
        "state": state,
        "state_text": description,
        "calls_5m": calls.calls,
        "failures_5m": calls.failures,
        "p95_ms": None if calls.p95_ms is None else round(calls.p95_ms, 1),
    }
    if occupancy is None:
        return {
            **row, "limiter": "unavailable", "in_use": None, "waiting": None, "oldest_wait_s": None,
            "requests_per_minute": None, "tokens_per_minute": None, "cooling_down_s": None,
            "circuit": None, "probe_in_s": None,
        }
    cooling_s = _left(occupancy.cooling_until, occupancy.now) if occupancy.cooling_until else 0.0
    return {
        **row,
        "limiter": "ok",
        "in_use": occupancy.in_use,
        "waiting": occupancy.waiting,
        "oldest_wait_s": round(occupancy.oldest_wait_s, 1),
        "requests_per_minute": _budget(occupancy.requests_in_window, service.requests_per_minute),
        "tokens_per_minute": _budget(occupancy.tokens_in_window, service.tokens_per_minute),
        "cooling_down_s": round(cooling_s, 1) or None,
        "circuit": occupancy.circuit,
        "probe_in_s": round(_left(occupancy.probe_at, occupancy.now), 1) if occupancy.circuit == "open" else None,
    }


def queue_rows(services, *, broker=None):
    """Each queue of CAO_QUEUES (and any other a service names) with its depths and its services."""
    queues = [*settings.CAO_QUEUES, settings.CAO_WEBHOOK_QUEUE]
    queues += sorted({service.queue for service in services} - set(queues))
    members = {queue: [service.name for service in services if service.queue == queue] for queue in queues}
    try:
        depths = {queue: (ready, delayed) for queue, ready, delayed in queue_depths(queues, broker=broker)}
    except RedisError as exc:
        logger.warning("Cannot read the queue depths from the broker: %s", exc)
        depths = {}
    return [
        {
            "name": queue,
            "services": members[queue],
            "ready": depths[queue][0] if queue in depths else None,
            "delayed": depths[queue][1] if queue in depths else None,
        }
        for queue in queues
    ]


def jobs_summary(*, now):
    minutes = jobs_per_minute(now=now, minutes=JOBS_WINDOW_MINUTES)
    completed = sum(minute.completed for minute in minutes)
    failed = sum(minute.failed for minute in minutes)
    return {
        "window_minutes": JOBS_WINDOW_MINUTES,
        "created": sum(minute.created for minute in minutes),
        "completed": completed,
        "failed": failed,
        "failure_rate": round(failed / (completed + failed), 4) if completed + failed else None,
        "minutes": [
            {"minute": m.minute.isoformat(), "created": m.created, "completed": m.completed, "failed": m.failed}
            for m in minutes
        ],
    }


def overview(*, now=None, limiter=None, broker=None):
    """The whole snapshot the overview page draws; ``now`` is the database side's clock."""
    now = now or timezone.now()
    services = service_list()
    occupancies = read_occupancies(services, limiter=limiter)
    calls = call_figures_by_service(since=now - CALLS_WINDOW)
    return {
        "generated_at": now.isoformat(),
        "calls_window_s": int(CALLS_WINDOW.total_seconds()),
        "services": [
            service_row(service, occupancies[service.name], calls.get(service.name, CallFigures()))
            for service in services
        ],
        "queues": queue_rows(services, broker=broker),
        "jobs": jobs_summary(now=now),
    }
