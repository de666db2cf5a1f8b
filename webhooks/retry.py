"""When a failed delivery is tried again: pure decisions, applied by ``webhooks.delivery``."""

import random
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Retry:
    """What follows a failed attempt: ``at`` the next try, or None to give up."""

    at: object  # datetime or None

    @property
    def gives_up(self):
        return self.at is None


def backoff_s(attempt, *, base_s, cap_s, rng=random.random):
    """Delay after failed attempt number ``attempt`` (1, 2, ...): base × 2^(attempt-1), capped, with full jitter
    in its upper half (so receivers that failed together do not come back together)."""
    ceiling = min(cap_s, base_s * (2 ** min(attempt - 1, 40)))
    return ceiling * (0.5 + 0.5 * rng())


def after_failure(*, attempt, now, give_up_at, retryable, base_s, cap_s, rng=random.random):
    """The ``Retry`` after failed attempt ``attempt``: none when not retryable or past ``give_up_at``."""
    if not retryable:
        return Retry(None)
    at = now + timedelta(seconds=backoff_s(attempt, base_s=base_s, cap_s=cap_s, rng=rng))
    return Retry(at if at <= give_up_at else None)
