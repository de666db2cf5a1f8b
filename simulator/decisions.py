"""Decide how to answer a call: pure functions from knobs to a small plan.

The app applies the plan (sleeps, then writes the reply); keeping the choice
here makes the precedence easy to read and to test: latency and hang add up
to one delay, then fail wins over malformed, and otherwise the call succeeds.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecutePlan:
    """How to answer one POST to the execute path."""

    delay_s: float
    status: int = 200
    retryable: bool = False
    malformed: str | None = None
    hang: bool = False
    retry_after_s: float | None = None  # sent as Retry-After with a 429 or 503


@dataclass(frozen=True)
class HealthPlan:
    """How to answer one GET /health."""

    delay_s: float
    status: int = 200


def decide_execute(knobs, call_numbers, *, rng):
    """The plan for a call; ``call_numbers[knob]`` counts this key's calls since that knob was set."""
    delay_s = knobs.latency.draw(rng) if knobs.latency else 0.0
    hang = knobs.hang is not None and knobs.hang.applies(call_numbers.get("hang", 1))
    if hang:
        delay_s += knobs.hang.seconds
    if knobs.fail and knobs.fail.applies(call_numbers.get("fail", 1)):
        retry_after_s = knobs.retry_after.seconds if knobs.retry_after and knobs.fail.status in (429, 503) else None
        return ExecutePlan(
            delay_s, status=knobs.fail.status, retryable=knobs.fail.retryable, hang=hang, retry_after_s=retry_after_s
        )
    if knobs.malformed and knobs.malformed.applies(call_numbers.get("malformed", 1)):
        return ExecutePlan(delay_s, malformed=knobs.malformed.kind, hang=hang)
    return ExecutePlan(delay_s, hang=hang)


def decide_health(knobs):
    """The plan for a health check."""
    delay_s = knobs.health_hang.seconds if knobs.health_hang else 0.0
    return HealthPlan(delay_s, status=knobs.health_fail.status if knobs.health_fail else 200)
