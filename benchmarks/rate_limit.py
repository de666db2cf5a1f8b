"""Requests per minute: the calls a rate-limited service sees in its busiest minute, against its limit.

    python -m benchmarks.rate_limit --rpm 120 --seconds 75

fast_chat_llm gets ``requests_per_minute = rpm`` (its concurrency limit
unchanged, the simulator at 0 ms), and more business_plan jobs than two
windows of the budget let through are created at once, so the service
stays held back by its budget for the whole run. After ``seconds``
the simulator's request log gives the start of every call: the most calls
in any window of the stack's CAO_RATE_WINDOW_S (a minute), which must never
exceed the limit.
"""

import time

from benchmarks.harness import case_main

SERVICE = "fast_chat_llm"
WINDOW_S = 60.0  # the stack's CAO_RATE_WINDOW_S


def busiest_window(starts, window_s):
    """The most of ``starts`` (sorted seconds) within any ``window_s`` span."""
    most, first = 0, 0
    for last, start in enumerate(starts):
        while start - starts[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def measure(bed, *, rpm=120, seconds=75.0, window_s=WINDOW_S):
    bed.set_service(SERVICE, requests_per_minute=rpm)
    bed.simulator.configure(latency={"*": None})
    bed.simulator.reset()
    # Workers read the registry through a cache: measure the budget once it applies.
    bed.wait_registry_applied()
    # A sliding window lets the budget through at the start of each window: enough jobs for two.
    jobs = int(rpm * 2.5) + 5
    started = time.monotonic()
    try:
        bed.submit_many(jobs, "business_plan", threads=8)
        # The measurement is the passing of time itself: calls are counted over it.
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
        starts = sorted(call["received_at"] for call in bed.simulator.requests(SERVICE, kind="execute", limit=10_000))
    finally:
        bed.set_service(SERVICE, requests_per_minute=0)  # the rest of the jobs finish before the next case
    busiest = busiest_window(starts, window_s)
    return {
        "rpm": rpm,
        "window_s": window_s,
        "seconds": seconds,
        "jobs": jobs,
        "calls": len(starts),
        "busiest_window_calls": busiest,
        "over_limit": max(0, busiest - rpm),
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, rpm=120, seconds=75.0)


if __name__ == "__main__":
    main()
