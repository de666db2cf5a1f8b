"""Knobs: per-service behaviour settings, parsed from text into frozen values.

The same text forms serve the command line (``--fail summarizer_pro=503x2``)
and the control API (``{"fail": {"summarizer_pro": "503x2"}}``):

- latency      ``200ms``, ``2s``, ``0``, with optional jitter ``200ms~50ms``
- fail         ``503`` (always) or ``503x2`` (first 2 calls per Idempotency-Key); ``x0`` = always
- hang         ``30s``, ``30sx1``, or nothing / ``x1`` for "forever" (an hour)
- malformed    nothing / ``invalid_json``, ``nostatus``, ``empty``, or a hostile reply (``nan``,
               ``infinity``, ``nul``, ``surrogate``, ``deep``, ``oversized``, ``echo_secret``,
               ``echo_secret_failed``, ``echo_secret_data``), each with optional ``xN``
- health_fail  nothing (503) or a status such as ``500``
- health_hang  a duration, or nothing for "forever"

A service of ``*`` stands for every simulated service; specific services
given alongside it win.
"""

import math
import re
from dataclasses import dataclass, field, replace

from simulator.errors import KnobError

FOREVER_S = 3600.0
MALFORMED_KINDS = (
    "invalid_json", "nostatus", "empty",
    # Valid-looking replies a database cannot store or a gateway must not keep:
    "nan", "infinity", "nul", "surrogate", "deep", "oversized",
    "echo_secret", "echo_secret_failed", "echo_secret_data",
)
ALL_SERVICES = "*"

_DURATION = re.compile(r"(?P<number>\d+(?:\.\d+)?|\.\d+)(?P<unit>ms|s|m|h)?")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_COUNTED = re.compile(r"(?P<value>[^x]*)(?:x(?P<count>\d+))?")
_STATUS = re.compile(r"\d{3}")


def parse_duration(text):
    """Seconds from ``200ms``, ``1.5s``, ``2m``, ``1h`` or ``0``."""
    text = text.strip()
    match = _DURATION.fullmatch(text)
    if not match:
        raise KnobError(f"bad duration {text!r}: use a number with a unit, e.g. 200ms, 2s, 1m (or 0)")
    number = float(match["number"])
    if match["unit"] is None and number != 0:
        raise KnobError(f"duration {text!r} needs a unit (ms, s, m or h)")
    return number * _UNIT_S[match["unit"] or "s"]


def format_duration(seconds):
    """The shortest text ``parse_duration`` reads back as ``seconds``."""
    if seconds == 0:
        return "0"
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and math.isclose(seconds % size, 0.0, abs_tol=1e-9):
            return f"{int(round(seconds / size))}{unit}"
    return f"{seconds * 1000:g}ms"


def _parse_count(text, kind):
    match = _COUNTED.fullmatch(text.strip())
    if not match:
        raise KnobError(f"bad {kind} value {text!r}: the count goes last, as in x2")
    count = int(match["count"]) if match["count"] is not None else 0
    # x0 and no count both mean "every call".
    return match["value"].strip(), (count or None)


def _parse_status(text, kind):
    if not _STATUS.fullmatch(text) or not 400 <= int(text) <= 599:
        raise KnobError(f"bad {kind} status {text!r}: use an HTTP error status from 400 to 599")
    return int(text)


def _with_count(text, count):
    return text if count is None else f"{text}x{count}"


@dataclass(frozen=True)
class Latency:
    """A delay before every reply: ``seconds`` plus or minus up to ``jitter_s``."""

    seconds: float
    jitter_s: float = 0.0

    def draw(self, rng):
        if not self.jitter_s:
            return self.seconds
        return max(0.0, rng.uniform(self.seconds - self.jitter_s, self.seconds + self.jitter_s))

    def __str__(self):
        text = format_duration(self.seconds)
        return f"{text}~{format_duration(self.jitter_s)}" if self.jitter_s else text


@dataclass(frozen=True)
class Counted:
    """A knob that applies to every call, or to the first ``count`` calls per Idempotency-Key."""

    count: int | None = field(default=None, kw_only=True)

    def applies(self, call_number):
        """Whether the knob acts on a key's ``call_number``-th call (1-based) since it was set."""
        return self.count is None or call_number <= self.count


@dataclass(frozen=True)
class Fail(Counted):
    """Answer ``status`` with a failure body instead of succeeding."""

    status: int

    @property
    def retryable(self):
        return self.status == 429 or self.status >= 500

    def __str__(self):
        return _with_count(str(self.status), self.count)


@dataclass(frozen=True)
class Hang(Counted):
    """Sleep ``seconds`` before answering, to outlast client timeouts."""

    seconds: float = FOREVER_S

    def __str__(self):
        return _with_count(format_duration(self.seconds), self.count)


@dataclass(frozen=True)
class Malformed(Counted):
    """Answer 200 with a broken body: not JSON, JSON without "status", or empty."""

    kind: str = "invalid_json"

    def __str__(self):
        return _with_count(self.kind, self.count)


@dataclass(frozen=True)
class RetryAfter:
    """Send ``Retry-After: <seconds>`` with every 429 or 503 the ``fail`` knob answers."""

    seconds: float

    def __str__(self):
        return format_duration(self.seconds)


@dataclass(frozen=True)
class HealthFail:
    """Answer GET /health with ``status``."""

    status: int = 503

    def __str__(self):
        return str(self.status)


@dataclass(frozen=True)
class HealthHang:
    """Sleep ``seconds`` before answering GET /health."""

    seconds: float = FOREVER_S

    def __str__(self):
        return format_duration(self.seconds)


def parse_latency(text):
    base, tilde, jitter = text.strip().partition("~")
    if not base or (tilde and not jitter):
        raise KnobError(f"bad latency {text!r}: use a duration with optional jitter, e.g. 200ms or 200ms~50ms")
    return Latency(parse_duration(base), parse_duration(jitter) if tilde else 0.0)


def parse_fail(text):
    value, count = _parse_count(text, "fail")
    if not value:
        raise KnobError(f"bad fail value {text!r}: give a status, e.g. 503 or 503x2")
    return Fail(_parse_status(value, "fail"), count=count)


def parse_hang(text):
    value, count = _parse_count(text, "hang")
    return Hang(parse_duration(value) if value else FOREVER_S, count=count)


def parse_malformed(text):
    value, count = _parse_count(text, "malformed")
    kind = value or "invalid_json"
    if kind not in MALFORMED_KINDS:
        raise KnobError(f"bad malformed kind {kind!r}: use one of {', '.join(MALFORMED_KINDS)}")
    return Malformed(kind, count=count)


def parse_retry_after(text):
    return RetryAfter(parse_duration(text))


def parse_health_fail(text):
    text = text.strip()
    return HealthFail(_parse_status(text, "health_fail") if text else 503)


def parse_health_hang(text):
    text = text.strip()
    return HealthHang(parse_duration(text) if text else FOREVER_S)


# Knob name -> (parser, whether the value may be left out).
PARSERS = {
    "latency": (parse_latency, False),
    "fail": (parse_fail, False),
    "retry_after": (parse_retry_after, False),
    "hang": (parse_hang, True),
    "malformed": (parse_malformed, True),
    "health_fail": (parse_health_fail, True),
    "health_hang": (parse_health_hang, True),
}
KNOBS = tuple(PARSERS)


@dataclass(frozen=True)
class ServiceKnobs:
    """Every knob of one service; None means "behave normally"."""

    latency: Latency | None = None
    fail: Fail | None = None
    retry_after: RetryAfter | None = None
    hang: Hang | None = None
    malformed: Malformed | None = None
    health_fail: HealthFail | None = None
    health_hang: HealthHang | None = None

    def as_json(self):
        return {name: str(getattr(self, name)) for name in KNOBS if getattr(self, name) is not None}


def parse_knob(kind, value):
    """The knob ``kind`` from its text (or JSON scalar); None removes the knob."""
    if kind not in PARSERS:
        raise KnobError(f"unknown knob {kind!r}: use one of {', '.join(KNOBS)}")
    if value is None:
        return None
    parser, optional = PARSERS[kind]
    if value is True:
        value = ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise KnobError(f"bad {kind} value {value!r}: give a string such as {'503x2' if kind == 'fail' else '200ms'}")
    text = str(value).strip()
    if not text and not optional:
        raise KnobError(f"{kind} needs a value")
    return parser(text)


def _parse_entry(kind, service, value, services):
    """``{(service, knob): value}`` for one entry; ``*`` expands to every service."""
    if service != ALL_SERVICES and service not in services:
        raise KnobError(f"unknown service {service!r} (known: {', '.join(services)})")
    knob = parse_knob(kind, value)
    return {(name, kind): knob for name in (services if service == ALL_SERVICES else [service])}


def _by_specificity(items):
    # "*" first, so entries naming a service explicitly override it.
    return sorted(items, key=lambda item: item[0] != ALL_SERVICES)


def parse_changes(changes, services):
    """Validate ``{knob: {service: text | None}}`` into ``{(service, knob): value | None}``."""
    if not isinstance(changes, dict):
        raise KnobError('knob changes must be an object like {"latency": {"fast_chat_llm": "200ms"}}')
    parsed = {}
    for kind, per_service in changes.items():
        if kind not in PARSERS:
            raise KnobError(f"unknown knob {kind!r}: use one of {', '.join(KNOBS)}")
        if not isinstance(per_service, dict):
            raise KnobError(f"{kind} must map service names to values")
        for service, value in _by_specificity(per_service.items()):
            try:
                parsed.update(_parse_entry(kind, service, value, services))
            except KnobError as exc:
                raise KnobError(f"{kind} of {service}: {exc}") from None
    return parsed


def parse_assignments(kind, assignments, services):
    """``{(service, knob): value}`` from command-line values like ``SERVICE=VALUE`` or ``SERVICE``."""
    flag = "--" + kind.replace("_", "-")
    entries = []
    for assignment in assignments:
        service, has_value, value = assignment.partition("=")
        if not service.strip():
            raise KnobError(f"{flag} {assignment!r}: expected SERVICE=VALUE")
        entries.append((service.strip(), value if has_value else True, assignment))
    parsed = {}
    for service, value, assignment in _by_specificity(entries):
        try:
            parsed.update(_parse_entry(kind, service, value, services))
        except KnobError as exc:
            raise KnobError(f"{flag} {assignment}: {exc}") from None
    return parsed


def config_apply(config, changes):
    """A new ``{service: ServiceKnobs}`` with ``changes`` (from ``parse_changes``) merged in."""
    updated = dict(config)
    for (service, kind), knob in changes.items():
        updated[service] = replace(updated.get(service, ServiceKnobs()), **{kind: knob})
    return updated


def config_as_json(config):
    """``{knob: {service: text}}``, the shape the control API accepts."""
    result = {kind: {} for kind in KNOBS}
    for service, knobs in sorted(config.items()):
        for kind, text in knobs.as_json().items():
            result[kind][service] = text
    return result
