"""When to retry a failed attempt: a pure decision, no I/O."""

import random


def retry_delay(*, attempt, max_attempts, retryable, base_s, cap_s, retry_after_s=None, rng=random.random):
    """Seconds to wait before the next attempt, or None to stop retrying.

    Exponential backoff with "equal jitter": the delay is drawn from the upper
    half of ``base * 2**(attempt-1)`` (capped), so retries of many jobs spread
    out but never fire at once. A ``Retry-After`` from the service is honoured
    up to the cap.
    """
    if not retryable or attempt >= max_attempts:
        return None
    ceiling = min(cap_s, base_s * 2 ** max(0, attempt - 1))
    delay = ceiling / 2 + rng() * ceiling / 2
    if retry_after_s:
        delay = max(delay, min(retry_after_s, cap_s))
    return delay
