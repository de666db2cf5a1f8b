"""Hand-off latency of the per-service limiter.

Measures the time from a holder's release() call to the moment a parked
waiter in another process, woken by its dispatched payload (BLPOP on a list
stands in for the message broker), has completed acquire() and holds the
slot. The plain Redis round trip is printed as the floor.

    python -m benchmarks.limiter_handoff --iterations 300

Timestamps cross processes: time.perf_counter_ns() reads the system-wide
monotonic clock on Linux and macOS, so they are comparable.
"""

import argparse
import multiprocessing
import os
import statistics
import time
import uuid

import redis

from orchestration.limiter import Limiter

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
TIMEOUT_S = 5
TTL_S = 30


def _percentiles(samples_ns):
    ms = sorted(s / 1e6 for s in samples_ns)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return {"p50": statistics.median(ms), "p95": p95, "max": ms[-1]}


def _waiter(redis_url, service, lists):
    """Child process: park when told, wait for the hand-off, take the slot."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    limiter = Limiter(client)
    while True:
        _, order = client.blpop([lists["park"]], timeout=TIMEOUT_S * 4)
        if order == "stop":
            return
        member = f"waiter-{order}"
        parked = limiter.acquire(service, member, limit=1, ttl_s=TTL_S, payload=lists["inbox"])
        if parked.granted:
            raise RuntimeError("the waiter found a free slot; the holder should have it")
        client.lpush(lists["ready"], "parked")
        if client.blpop([lists["inbox"]], timeout=TIMEOUT_S) is None:
            raise RuntimeError("the waiter's hand-off never arrived")
        if not limiter.acquire(service, member, limit=1, ttl_s=TTL_S, payload=lists["inbox"]).granted:
            raise RuntimeError("the hand-off arrived but the slot was not reserved")
        holds_at = time.perf_counter_ns()
        limiter.release(service, member, limit=1)
        client.lpush(lists["done"], holds_at)


def run(iterations=300, *, redis_url=None, warmup=20):
    """Run the benchmark; return percentiles in ms per measured step."""
    redis_url = redis_url or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    limiter = Limiter(client)
    service = f"bench-{uuid.uuid4().hex[:8]}"
    lists = {name: f"bench:{service}:{name}" for name in ("park", "ready", "inbox", "done")}
    child = multiprocessing.get_context("fork").Process(target=_waiter, args=(redis_url, service, lists))
    child.start()
    handoff, release, ping = [], [], []
    try:
        for i in range(warmup + iterations):
            holder = f"holder-{i}"
            if not limiter.acquire(service, holder, limit=1, ttl_s=TTL_S, payload="unused").granted:
                raise RuntimeError("the holder did not get the free slot")
            client.lpush(lists["park"], i)
            if client.blpop([lists["ready"]], timeout=TIMEOUT_S) is None:
                raise RuntimeError("the waiter process did not park")

            released_at = time.perf_counter_ns()
            handoffs = limiter.release(service, holder, limit=1)
            release_done = time.perf_counter_ns()
            for inbox in handoffs:  # the dispatch
                client.lpush(inbox, "go")
            reply = client.blpop([lists["done"]], timeout=TIMEOUT_S)
            if reply is None:
                raise RuntimeError("the waiter never took the slot")

            ping_started = time.perf_counter_ns()
            client.ping()
            ping_done = time.perf_counter_ns()
            if i >= warmup:
                handoff.append(int(reply[1]) - released_at)
                release.append(release_done - released_at)
                ping.append(ping_done - ping_started)
        client.lpush(lists["park"], "stop")
        child.join(TIMEOUT_S)
    finally:
        if child.is_alive():
            child.kill()
        client.delete(*limiter.keys(service), *lists.values())
        client.close()
    return {
        "iterations": iterations,
        "handoff_ms": _percentiles(handoff),
        "release_call_ms": _percentiles(release),
        "redis_ping_ms": _percentiles(ping),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=300, help="measured hand-offs (default 300)")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured hand-offs first (default 20)")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL),
        help="Redis to use; only keys of a random bench-* service are touched (default $REDIS_URL or %(default)s)",
    )
    args = parser.parse_args(argv)
    result = run(args.iterations, redis_url=args.redis_url, warmup=args.warmup)
    rows = [
        ("release() -> waiter holds the slot", result["handoff_ms"]),
        ("release() call alone", result["release_call_ms"]),
        ("Redis PING round trip (floor)", result["redis_ping_ms"]),
    ]
    print(f"limiter hand-off, {args.iterations} iterations, {args.redis_url}")
    print(f"{'':38}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    for label, p in rows:
        print(f"{label:38}{p['p50']:9.3f}{p['p95']:9.3f}{p['max']:9.3f}")


if __name__ == "__main__":
    main()
