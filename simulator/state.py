"""The simulator's mutable state: knobs in force, counters, and the request log.

Only the server's event loop touches it (the control API is the way in from
outside), so no locks are needed.
"""

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from simulator.knobs import ServiceKnobs, config_apply, config_as_json

MAX_LOGGED_BODY_CHARS = 4096


@dataclass
class ServiceStats:
    """Counters of one service since the last reset."""

    in_flight: int = 0
    max_in_flight: int = 0
    calls: int = 0
    health_calls: int = 0
    calls_by_key: Counter = field(default_factory=Counter)
    status_counts: Counter = field(default_factory=Counter)
    health_status_counts: Counter = field(default_factory=Counter)

    def as_json(self, *, keys=True):
        result = {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "calls": self.calls,
            "health_calls": self.health_calls,
            "status_counts": dict(self.status_counts),
            "health_status_counts": dict(self.health_status_counts),
        }
        if keys:
            result["calls_by_key"] = dict(self.calls_by_key)
        return result


class SimulatorState:
    """Knobs, counters and recent requests of every simulated service."""

    def __init__(self, services, *, config=None, request_log_size=1000, clock=time.time):
        self.services = tuple(services)
        self.initial_config = {service: ServiceKnobs() for service in self.services} | dict(config or {})
        self.config = dict(self.initial_config)
        self.stats = {service: ServiceStats() for service in self.services}
        # (service, knob) -> Counter of calls per Idempotency-Key since the knob was set.
        self.knob_calls = {}
        self.request_log = deque(maxlen=request_log_size)
        self.request_seq = 0
        self._clock = clock

    # --- Calls ----------------------------------------------------------------

    def call_started(self, service):
        stats = self.stats[service]
        stats.calls += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)

    def call_counted(self, service, key):
        """Count a valid call of ``key``; return its call number for each knob that counts."""
        self.stats[service].calls_by_key[key] += 1
        numbers = {}
        knobs = self.config[service]
        for kind in ("fail", "hang", "malformed"):
            knob = getattr(knobs, kind)
            if knob is not None and knob.count is not None:
                counter = self.knob_calls.setdefault((service, kind), Counter())
                counter[key] += 1
                numbers[kind] = counter[key]
        return numbers

    def call_finished(self, service, outcome, entry=None):
        """``outcome`` is the HTTP status answered, or "disconnected"."""
        stats = self.stats[service]
        stats.in_flight -= 1
        stats.status_counts[str(outcome)] += 1
        if entry is not None:
            entry["status"] = outcome

    def health_checked(self, service, outcome, entry=None):
        self.stats[service].health_calls += 1
        self.stats[service].health_status_counts[str(outcome)] += 1
        if entry is not None:
            entry["status"] = outcome

    def request_record(self, service, *, kind, method, path, query, headers, body):
        """Log a received request; returns the entry so its status can be filled in later."""
        self.request_seq += 1
        try:
            parsed = json.loads(body) if body else None
            text = None
        except (UnicodeDecodeError, ValueError):
            parsed = None
            text = body[:MAX_LOGGED_BODY_CHARS].decode("utf-8", "replace")
        entry = {
            "seq": self.request_seq,
            "service": service,
            "kind": kind,
            "method": method,
            "path": path,
            "query": query,
            "headers": headers,
            "json": parsed,
            "body_text": text,
            "received_at": self._clock(),
            "status": None,
        }
        self.request_log.append(entry)
        return entry

    # --- Control --------------------------------------------------------------

    def config_update(self, changes):
        """Merge parsed knob changes; a changed knob starts counting calls afresh."""
        self.config = config_apply(self.config, changes)
        for service_kind in changes:
            self.knob_calls.pop(service_kind, None)

    def reset(self, *, config=False):
        """Clear counters, per-key knob counts and the log; also restore the startup knobs if ``config``."""
        for service, old in self.stats.items():
            # Calls still running will decrement in_flight when they end.
            self.stats[service] = ServiceStats(in_flight=old.in_flight, max_in_flight=old.in_flight)
        self.knob_calls.clear()
        self.request_log.clear()
        if config:
            self.config = dict(self.initial_config)

    def stats_json(self, *, service=None, keys=True):
        services = [service] if service else self.services
        return {name: self.stats[name].as_json(keys=keys) for name in services}

    def config_json(self):
        return config_as_json(self.config)

    def requests_recent(self, *, service=None, kind=None, limit=None):
        """The latest logged requests, oldest first."""
        entries = [
            entry
            for entry in self.request_log
            if (service is None or entry["service"] == service) and (kind is None or entry["kind"] == kind)
        ]
        return entries[-limit:] if limit else entries

