"""A private, real stack for benchmarks: the same processes as `make serve`.

It uses its own database (``cao_bench``), its own Redis database number (13)
and its own ports, so a benchmark never touches a developer's local stack.
"""

import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import psycopg2
import redis
import requests

from scripts.local_backends import ensure_database
from scripts.stack import ROOT, RUN_DIR, Stack, simulator_env, stack_processes

BENCH_DATABASE = "cao_bench"
BENCH_REDIS_DB = 13


def percentile(values, fraction):
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def summary_ms(samples_s):
    """p50 / p95 / max of samples given in seconds, in milliseconds."""
    ms = [s * 1000 for s in samples_s]
    return {"p50": statistics.median(ms), "p95": percentile(ms, 0.95), "max": max(ms), "n": len(ms)}


def bench_urls():
    from urllib.parse import urlsplit, urlunsplit

    base_db = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/cao")
    parts = urlsplit(base_db)
    database_url = urlunsplit(parts._replace(path=f"/{BENCH_DATABASE}"))
    redis_parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    redis_url = urlunsplit(redis_parts._replace(path=f"/{BENCH_REDIS_DB}"))
    return database_url, redis_url


class BenchStack:
    """Start the stack, hand out an API key and a database cursor, stop it all."""

    def __init__(self, *, port=8310, simulator_port=9310, simulator_args=(), env=None, scheduler=True):
        self.port = port
        self.simulator_port = simulator_port
        self.simulator_args = list(simulator_args)
        self.database_url, self.redis_url = bench_urls()
        self.env = {
            **os.environ,
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis_url,
            "BROKER_URL": self.redis_url,
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(40),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "WARNING"),
            **(env or {}),
        }
        self.env.update(simulator_env({}, simulator_port))
        self.scheduler = scheduler
        self.base_url = f"http://127.0.0.1:{port}"
        self.simulator_url = f"http://127.0.0.1:{simulator_port}"
        self.stack = None
        self.api_key = None
        self.session = requests.Session()

    def manage(self, *args):
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=self.env, check=True, capture_output=True, text=True
        )

    def __enter__(self):
        ensure_database(self.database_url)
        redis.Redis.from_url(self.redis_url).flushdb()
        self.manage("migrate", "--noinput", "-v", "0")
        self.reset_jobs()
        self.api_key = self.manage("create_api_key", "bench", "--staff").stdout.strip().splitlines()[-1]
        specs = stack_processes(
            python=sys.executable,
            host="127.0.0.1",
            port=self.port,
            simulator_port=self.simulator_port,
            simulator_args=self.simulator_args,
        )
        if not self.scheduler:
            specs = [spec for spec in specs if spec.name != "scheduler"]
        log_dir = RUN_DIR / "bench-logs" / datetime.now().strftime("%Y%m%d-%H%M%S")
        self.stack = Stack(specs, env=self.env, log_dir=log_dir)
        self.stack.start_all()
        self.wait_ready()
        return self

    def __exit__(self, *exc_info):
        if self.stack:
            self.stack.stop_all()

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if (
                    self.session.get(f"{self.base_url}/api/v1/health", timeout=1).ok
                    and self.session.get(f"{self.simulator_url}/_sim/health", timeout=1).ok
                ):
                    # Give the workers a moment to declare their queues.
                    time.sleep(1.5)
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the benchmark stack did not start; see {self.stack.log_dir}")

    def reset_jobs(self):
        with self.cursor() as cursor:
            cursor.execute("TRUNCATE jobs_job, jobs_stepattempt, jobs_jobevent")

    @contextmanager
    def cursor(self):
        conn = psycopg2.connect(self.database_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                yield cursor
        finally:
            conn.close()

    def submit(self, feature="business_plan", input_data=None, session=None):
        response = (session or self.session).post(
            f"{self.base_url}/api/v1/jobs",
            json={"feature_name": feature, "input_data": input_data or {"business_name": "Bench Co"}},
            headers={"X-API-Key": self.api_key},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["job_id"]

    def submit_many(self, count, feature="business_plan", threads=16):
        sessions = [requests.Session() for _ in range(threads)]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda i: self.submit(feature, session=sessions[i % threads]), range(count)))

    def wait_finished(self, job_ids, timeout=600, interval=0.2):
        """Wait until every job is COMPLETED (raises on FAILED/timeout)."""
        deadline = time.monotonic() + timeout
        ids = list(job_ids)
        while time.monotonic() < deadline:
            with self.cursor() as cursor:
                cursor.execute(
                    "SELECT status, count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) GROUP BY status", [ids]
                )
                counts = dict(cursor.fetchall())
            if counts.get("FAILED") or counts.get("CANCELLED"):
                raise RuntimeError(f"benchmark jobs failed: {counts}")
            if counts.get("COMPLETED", 0) == len(ids):
                return
            time.sleep(interval)
        raise RuntimeError(f"jobs did not finish within {timeout} s: {counts}")

    def simulator_configure(self, **knobs):
        self.session.post(f"{self.simulator_url}/_sim/config", data=json.dumps(knobs), timeout=5).raise_for_status()
