"""Benchmarks run the real stack (scripts.testbed) against a private database
(``cao_bench``) and Redis database number (13), so they never touch a
developer's local stack."""

import os
import statistics
from datetime import datetime
from urllib.parse import urlsplit, urlunsplit

from scripts.stack import RUN_DIR
from scripts.testbed import Testbed, with_database

BENCH_DATABASE = os.environ.get("CAO_BENCH_DATABASE", "cao_bench")
BENCH_REDIS_DB = int(os.environ.get("CAO_BENCH_REDIS_DB", "13"))


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary_ms(samples_s):
    """p50 / p95 / max of samples given in seconds, in milliseconds."""
    ms = [s * 1000 for s in samples_s]
    if not ms:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    return {
        "p50": round(statistics.median(ms), 2),
        "p95": round(percentile(ms, 0.95), 2),
        "max": round(max(ms), 2),
        "n": len(ms),
    }


def bench_testbed(**options):
    """A Testbed on the benchmark database and Redis db; quiet logs unless LOG_LEVEL says otherwise."""
    database_url = with_database(os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/cao"), BENCH_DATABASE)
    redis_parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    redis_url = urlunsplit(redis_parts._replace(path=f"/{BENCH_REDIS_DB}"))
    env = {
        "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
        "CAO_THROTTLE_RATE": "none",
        "CAO_JOB_CREATE_THROTTLE_RATE": "none",
        **options.pop("env", {}),
    }
    log_dir = RUN_DIR / "bench-logs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    return Testbed(database_url=database_url, redis_url=redis_url, log_dir=log_dir, env=env, **options)
