"""orchestration.retry.retry_delay: backoff, jitter, cap and Retry-After, one row per case."""

import random

import pytest

from orchestration.retry import retry_delay

BASE, CAP = 1.0, 60.0


@pytest.mark.parametrize(
    "attempt, max_attempts, retryable, retry_after_s, draw, expected",
    [
        # Stop: a permanent error, or the attempt budget is spent.
        (1, 5, False, None, 0.0, None),
        (1, 5, False, 10.0, 0.0, None),  # Retry-After never makes a permanent error retryable
        (5, 5, True, None, 0.0, None),  # the last attempt failed
        (6, 5, True, None, 0.0, None),  # past the budget (a lowered max_attempts)
        (1, 1, True, None, 0.0, None),  # a budget of one attempt never retries
        (5, 5, True, 3.0, 0.0, None),  # Retry-After does not extend the budget
        # Exponential backoff: the ceiling doubles per attempt from the base.
        (1, 5, True, None, 0.0, 0.5),
        (2, 5, True, None, 0.0, 1.0),
        (3, 5, True, None, 0.0, 2.0),
        (4, 5, True, None, 0.0, 4.0),
        (0, 5, True, None, 0.0, 0.5),  # a zero attempt number is treated as the first
        # Equal jitter: the delay lies in the upper half of the ceiling.
        (3, 5, True, None, 0.5, 3.0),
        (3, 5, True, None, 0.25, 2.5),
        (3, 5, True, None, 1.0, 4.0),  # the draw's upper bound reaches the ceiling, never beyond
        # Cap: the ceiling never exceeds cap_s, however many attempts.
        (6, 99, True, None, 0.0, 16.0),  # 32 s ceiling, below the cap
        (7, 99, True, None, 0.0, 30.0),  # 64 s would exceed the 60 s cap
        (7, 99, True, None, 1.0, 60.0),
        (40, 99, True, None, 1.0, 60.0),
        # Retry-After: honoured when longer than the backoff, up to the cap.
        (1, 5, True, 10.0, 0.0, 10.0),
        (3, 5, True, 0.2, 0.0, 2.0),  # shorter than the backoff: the backoff wins
        (1, 5, True, 120.0, 0.0, 60.0),  # longer than the cap: capped
        (1, 5, True, 60.0, 0.0, 60.0),
        (1, 5, True, 0.0, 0.0, 0.5),  # "Retry-After: 0" leaves the backoff alone
    ],
)
def test_retry_delay(attempt, max_attempts, retryable, retry_after_s, draw, expected):
    delay = retry_delay(
        attempt=attempt,
        max_attempts=max_attempts,
        retryable=retryable,
        retry_after_s=retry_after_s,
        base_s=BASE,
        cap_s=CAP,
        rng=lambda: draw,
    )

    assert delay == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "base_s, cap_s, attempt, draw, expected",
    [
        (0.1, 5.0, 1, 0.0, 0.05),
        (0.1, 5.0, 3, 1.0, 0.4),
        (0.1, 5.0, 10, 0.0, 2.5),  # 51.2 s capped at 5 s
        (2.0, 3.0, 2, 0.0, 1.5),  # 4 s capped at 3 s
    ],
)
def test_base_and_cap_come_from_the_caller(base_s, cap_s, attempt, draw, expected):
    delay = retry_delay(
        attempt=attempt, max_attempts=99, retryable=True, base_s=base_s, cap_s=cap_s, rng=lambda: draw
    )

    assert delay == pytest.approx(expected)


def test_jitter_spreads_retries_over_the_upper_half_of_each_ceiling():
    rng = random.Random(20)  # fixed seed: the same draws every run

    for attempt in range(1, 10):
        ceiling = min(CAP, BASE * 2 ** (attempt - 1))
        delays = [
            retry_delay(attempt=attempt, max_attempts=99, retryable=True, base_s=BASE, cap_s=CAP, rng=rng.random)
            for _ in range(200)
        ]
        assert all(ceiling / 2 <= delay <= ceiling for delay in delays), attempt
        # Spread out, not one value: jobs failing together do not retry together.
        assert max(delays) - min(delays) > ceiling / 4, attempt


def test_without_an_rng_the_delay_is_still_within_bounds():
    delay = retry_delay(attempt=2, max_attempts=3, retryable=True, base_s=BASE, cap_s=CAP)

    assert 1.0 <= delay <= 2.0
