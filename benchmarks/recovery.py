"""Recovery: seconds from a fault to every job done, with production recovery settings.

    python -m benchmarks.recovery [--jobs 10] [--call-s 2]

Runs on a stack of its own (the checkout of the main benchmark stack, so
``--app-root`` measures an older one too), with a private redis-server it
may restart and a database of its own, because the faults would disturb the
other cases. For each worker queue: calls of ``call_s`` in flight on that
queue's service, the worker SIGKILLed and restarted 2 s later (as compose
restarts it); time from the kill until every job is done. Then Redis: killed
mid-run and back 2 s later, empty; time from its return until every job is
done. Maintenance keeps its production interval (60 s) and grace (30 s).
"""

import time
from contextlib import contextmanager
from urllib.parse import urlsplit

from benchmarks.harness import bench_testbed, bench_urls
from scripts.stack import ROOT, WORKER_POOLS
from scripts.testbed import PrivateRedis, wait_until, with_database

# queue -> (a feature whose steps use it, the service on that queue)
QUEUES = {
    "medium": ("business_plan", "fast_chat_llm"),
    "default": ("business_plan", "prompt_enhancer"),
    "heavy": ("viral_video", "video_gen_v2"),
}
PRODUCTION_RECOVERY = {
    "SANITY_CHECK_INTERVAL_SECONDS": "60",
    "CAO_REDISPATCH_GRACE_S": "30",
    "CAO_HANDOFF_TTL_S": "30",
    "CAO_BROKER_HEARTBEAT_TIMEOUT_MS": "60000",
}
WORKER_DOWN_S = 2.0
REDIS_DOWN_S = 2.0


def measure(bed=None, *, jobs=10, call_s=2.0, redis_jobs=30, timeout_s=240, queues=QUEUES):
    """Kill → done per queue of ``queues``, and Redis back → done, in seconds (None past ``timeout_s``).

    Each scenario gets a fresh stack, so one that never recovers (the code
    before event-driven recovery left a default-queue job for hours) cannot
    spoil the next.
    """
    root = bed.root if bed is not None else ROOT
    database_url = _database_url(bed)
    result = {"settings": PRODUCTION_RECOVERY, "worker_kill_s": {}}
    for queue in queues:
        with _stack(root, database_url) as (stack, _redis):
            result["worker_kill_s"][queue] = _worker_kill(stack, queue, jobs=jobs, call_s=call_s, timeout_s=timeout_s)
    with _stack(root, database_url) as (stack, redis):
        result["redis_restart_s"] = _redis_restart(stack, redis, jobs=redis_jobs, timeout_s=timeout_s)
    kills = [seconds for seconds in result["worker_kill_s"].values() if seconds is not None]
    result["worker_kill_worst_s"] = max(kills) if len(kills) == len(queues) else None
    return result


def _database_url(bed):
    # Named after the main benchmark stack's database, so two runs (two
    # test suites' smoke runs included) never share it.
    database_url = bed.database_url if bed is not None else bench_urls()[0]
    name = urlsplit(database_url).path.lstrip("/") or "cao_bench"
    return with_database(database_url, f"{name}_recovery")


@contextmanager
def _stack(root, database_url):
    redis = PrivateRedis().start()
    try:
        with bench_testbed(root=root, database_url=database_url, redis_url=redis.url(0), env=PRODUCTION_RECOVERY) as stack:
            yield stack, redis
    finally:
        redis.close()


def _worker_kill(stack, queue, *, jobs, call_s, timeout_s):
    feature, service = QUEUES[queue]
    stack.set_service(service, concurrency_limit=jobs, timeout_s=max(10, 3 * call_s))
    stack.simulator.configure(latency={service: f"{int(call_s * 1000)}ms"})
    job_ids = stack.submit_many(jobs, feature)
    # Thread workers bound the calls in flight (4 on the heavy queue).
    in_flight = min(jobs, WORKER_POOLS[stack.worker_mode][queue][1])
    wait_until(
        lambda: stack.simulator.stats(service)["in_flight"] >= in_flight, timeout=60,
        message=f"{in_flight} calls to {service}",
    )
    killed = time.monotonic()
    stack.kill(f"worker_{queue}")
    time.sleep(WORKER_DOWN_S)  # the worker's downtime, part of the scenario
    stack.start(f"worker_{queue}")
    try:
        stack.wait_finished(job_ids, timeout=timeout_s)
    except TimeoutError:
        return None
    return round(time.monotonic() - killed, 1)


def _redis_restart(stack, redis, *, jobs, timeout_s):
    stack.simulator.configure(latency={"*": "150ms"})
    job_ids = stack.submit_many(jobs)
    wait_until(lambda: stack.statuses(job_ids).get("COMPLETED", 0) >= 3, timeout=60, message="some jobs done")
    redis.stop(kill=True)
    time.sleep(REDIS_DOWN_S)  # Redis's downtime, part of the scenario
    redis.start()
    back = time.monotonic()
    try:
        stack.wait_finished(job_ids, timeout=timeout_s)
    except TimeoutError:
        return None
    return round(time.monotonic() - back, 1)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--call-s", type=float, default=2.0)
    parser.add_argument("--redis-jobs", type=int, default=30)
    parser.add_argument("--timeout-s", type=float, default=240)
    args = parser.parse_args()
    print(json.dumps(measure(jobs=args.jobs, call_s=args.call_s, redis_jobs=args.redis_jobs, timeout_s=args.timeout_s), indent=2))
