"""Waiting on a condition with a deadline: the one polling loop of the tests, benchmarks and tooling."""

import time


def wait_until(predicate, *, timeout, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns a truthy value, which is returned; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)
