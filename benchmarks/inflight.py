"""Calls in flight at a raised limit: slots, not threads, bound concurrency.

    python -m benchmarks.inflight --jobs 330 --limit 300

An ops person raises fast_chat_llm's limit to ``limit`` and its calls take
``call_s``. ``jobs`` business_plan jobs are created while the workers are
stopped, then the workers start: every job reaches its fast_chat_llm step
within a second or so, so the calls in flight are bounded by the gateway's
own concurrency, not by the rate of intake. Figures: the most calls the
simulator saw in flight (and the limit they must never exceed), and the most
PostgreSQL connections of the whole stack to its database, sampled every
100 ms until every job finished.
"""

import threading

from benchmarks.harness import case_main, workers_held

SERVICE = "fast_chat_llm"


class Sampler:
    """Samples ``probe()`` every ``interval_s`` in a thread; keeps the maximum."""

    def __init__(self, probe, interval_s=0.1):
        self.probe, self.interval_s = probe, interval_s
        self.maximum = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.maximum = max(self.maximum, self.probe())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(bed, *, jobs=330, limit=300, call_s=2.0):
    bed.set_service(SERVICE, concurrency_limit=limit, timeout_s=max(15, call_s * 5), lease_ttl_s=max(30, call_s * 10))
    bed.simulator.configure(latency={"*": None, SERVICE: f"{int(call_s * 1000)}ms"})
    bed.simulator.reset()
    with workers_held(bed) as resume:
        job_ids = bed.submit_many(jobs, "business_plan", threads=16)
        with Sampler(bed.database_connections) as connections:
            resume()
            seconds = bed.wait_finished(job_ids, timeout=120 + jobs * call_s / 10)
    stats = bed.simulator.stats(SERVICE, keys=False)
    bed.set_service(SERVICE, concurrency_limit=15, timeout_s=15, lease_ttl_s=30)
    return {
        "jobs": jobs,
        "limit": limit,
        "call_s": call_s,
        "max_in_flight": stats["max_in_flight"],
        "limit_exceeded": stats["max_in_flight"] > limit,
        "pg_connections_max": connections.maximum,
        "seconds": round(seconds, 2),
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, jobs=330, limit=300, call_s=2.0)


if __name__ == "__main__":
    main()
