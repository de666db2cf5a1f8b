"""Benchmarks run the real stack (scripts.testbed) against a private database
(``cao_bench``, or ``$CAO_BENCH_DATABASE``) and Redis database number (13, or
``$CAO_BENCH_REDIS_DB``), so they never touch a developer's local stack."""

import os
import statistics
import time
from contextlib import contextmanager
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from scripts.stack import ROOT, RUN_DIR
from scripts.testbed import Testbed, wait_until, with_database

BENCH_DATABASE = os.environ.get("CAO_BENCH_DATABASE", "cao_bench")
BENCH_REDIS_DB = int(os.environ.get("CAO_BENCH_REDIS_DB", "13"))
ACTIVE_STATUSES = ("PENDING", "RUNNING")
WORKERS = ("worker_heavy", "worker_medium", "worker_default")


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary_ms(samples_s):
    """p50 / p95 / p99 / max of samples given in seconds, in milliseconds."""
    ms = [s * 1000 for s in samples_s]
    if not ms:
        return {"p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    return {
        "p50": round(statistics.median(ms), 2),
        "p95": round(percentile(ms, 0.95), 2),
        "p99": round(percentile(ms, 0.99), 2),
        "max": round(max(ms), 2),
        "n": len(ms),
    }


def bench_urls():
    """(database URL, Redis URL) of the benchmark's private database and Redis db."""
    database_url = with_database(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/cao"), BENCH_DATABASE)
    redis_parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return database_url, urlunsplit(redis_parts._replace(path=f"/{BENCH_REDIS_DB}"))


def bench_testbed(*, root=ROOT, database_url=None, redis_url=None, **options):
    """A Testbed on the benchmark database and Redis db; quiet logs unless LOG_LEVEL says otherwise.

    ``root`` is the checkout whose stack runs (default: this one).
    """
    default_database_url, default_redis_url = bench_urls()
    env = {
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        "CAO_THROTTLE_RATE": "none",
        "CAO_JOB_CREATE_THROTTLE_RATE": "none",
        **options.pop("env", {}),
    }
    log_dir = RUN_DIR / "bench-logs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    return Testbed(
        database_url=database_url or default_database_url,
        redis_url=redis_url or default_redis_url,
        log_dir=log_dir,
        env=env,
        root=root,
        **options,
    )


def wait_idle(bed, *, timeout=300):
    """Wait until no job of the testbed is PENDING or RUNNING."""
    wait_until(
        lambda: not bed.sql("SELECT 1 FROM jobs_job WHERE status = ANY(%s) LIMIT 1", [list(ACTIVE_STATUSES)]),
        timeout=timeout,
        interval=0.2,
        message=f"every job to finish (logs in {bed.log_dir})",
    )


def reset(bed, *, settle_s=0.5):
    """Between cases: no work left, simulator back to 0 ms, reference limits, empty job tables."""
    wait_idle(bed)
    bed.simulator.reset(config=True)
    bed.set_service("video_gen_v2", concurrency_limit=2)
    bed.sql("TRUNCATE jobs_job, jobs_stepattempt, jobs_jobevent CASCADE")  # and the webhook outbox
    time.sleep(settle_s)


def events(bed, job_ids=None):
    """Stored events (payload dicts, ``ts`` parsed to epoch seconds), in commit order per job."""
    if job_ids is None:
        rows = bed.sql("SELECT payload FROM jobs_jobevent ORDER BY job_id, seq")
    else:
        rows = bed.sql(
            "SELECT payload FROM jobs_jobevent WHERE job_id = ANY(%s::uuid[]) ORDER BY job_id, seq", [list(job_ids)]
        )
    return [{**payload, "ts": datetime.fromisoformat(payload["ts"]).timestamp()} for (payload,) in rows]


@contextmanager
def workers_held(bed):
    """Stop the workers for the block (messages wait in their queues); ``resume()`` starts them early."""
    workers = [name for name in WORKERS if name in bed.process_names]
    for name in workers:
        bed.stack.stop(name)

    def resume():
        for name in workers:
            if not bed.alive(name):
                bed.start(name)

    try:
        yield resume
    finally:
        resume()


def run_case(measure, **sizes):
    """Start a benchmark stack, run one case on it, and stop it."""
    with bench_testbed() as bed:
        return measure(bed, **sizes)


def case_main(measure, doc, *, argv=None, **size_defaults):
    """Command line of one case: ``--<size> N`` options, prints the figures as JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    for name, default in size_defaults.items():
        parser.add_argument(f"--{name}", type=type(default), default=default)
    sizes = vars(parser.parse_args(argv))
    print(json.dumps(run_case(measure, **sizes), indent=2))
