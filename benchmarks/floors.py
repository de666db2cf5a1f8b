"""Floors: what the stack's building blocks cost on this machine, in the same run.

The other cases are printed as multiples of these, so a figure measured on a
busy machine can still be compared with one measured on a quiet one.

- PostgreSQL commit: BEGIN, a single-row INSERT, COMMIT on one psycopg2
  connection (three round trips, as Django's ``atomic`` runs them), into a
  regular table so the commit flushes the WAL like the stack's do.
- PostgreSQL ``SELECT 1``: one round trip, for scale.
- Redis round trip: ``PING``.
- Dramatiq message: send to a no-op actor on a dedicated queue of the same
  Redis database, until the actor starts in a Worker running in this process
  with Dramatiq's default ``worker_timeout``. Measured with the gateway's
  broker (``orchestration.broker.NotifyingRedisBroker``, the floor the other
  figures are compared with) and with Dramatiq's stock ``RedisBroker``, each
  back to back (sent as soon as the previous one ran) and after an idle gap:
  the stock consumer polls an empty queue with a growing back-off (up to
  ``worker_timeout``); the gateway's is woken by the enqueue.

    python -m benchmarks.floors --samples 200
"""

import argparse
import json
import queue
import time
import uuid
from types import SimpleNamespace

import dramatiq
import psycopg2
import redis
from dramatiq.brokers.redis import RedisBroker

from benchmarks.harness import bench_urls, summary_ms
from orchestration.broker import NotifyingRedisBroker

FLOOR_QUEUE = "cao_bench_floor"


def _timed(operation, samples, *, warmup=5):
    durations = []
    for i in range(warmup + samples):
        started = time.perf_counter()
        operation()
        if i >= warmup:
            durations.append(time.perf_counter() - started)
    return durations


def postgres_floors(database_url, *, samples):
    table = f"bench_floor_{uuid.uuid4().hex[:8]}"
    conn = psycopg2.connect(database_url, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
            cursor.execute("SHOW synchronous_commit")
            (synchronous_commit,) = cursor.fetchone()
            cursor.execute("SHOW fsync")
            (fsync,) = cursor.fetchone()
            select = _timed(lambda: (cursor.execute("SELECT 1"), cursor.fetchone()), samples)
        conn.autocommit = False
        with conn.cursor() as cursor:

            def commit():
                cursor.execute(f"INSERT INTO {table} DEFAULT VALUES")
                conn.commit()

            commits = _timed(commit, samples)
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(f"DROP TABLE {table}")
    finally:
        conn.close()
    return {
        "pg_commit_ms": summary_ms(commits),
        "pg_select_ms": summary_ms(select),
        "pg_settings": {"synchronous_commit": synchronous_commit, "fsync": fsync},
    }


def redis_floor(redis_url, *, samples):
    client = redis.Redis.from_url(redis_url)
    try:
        return {"redis_ping_ms": summary_ms(_timed(client.ping, samples))}
    finally:
        client.close()


def dramatiq_floor(redis_url, *, samples, idle_samples, idle_gap_s=0.2, broker_class=NotifyingRedisBroker, prefix=""):
    """send() -> a no-op actor starts, back to back and after ``idle_gap_s`` of an empty queue."""
    broker = broker_class(url=redis_url, middleware=[])
    started = queue.SimpleQueue()

    def noop():
        started.put(time.perf_counter())

    actor = dramatiq.actor(noop, broker=broker, actor_name="cao_bench_floor_noop", queue_name=FLOOR_QUEUE)
    worker = dramatiq.Worker(broker, queues={FLOOR_QUEUE}, worker_threads=1)
    worker.start()

    def round_trip(gap_s):
        time.sleep(gap_s)
        sent = time.perf_counter()
        actor.send()
        return started.get(timeout=10) - sent

    try:
        for _ in range(5):
            round_trip(0)
        busy = [round_trip(0) for _ in range(samples)]
        idle = [round_trip(idle_gap_s) for _ in range(idle_samples)]
    finally:
        worker.stop(timeout=5000)
        broker.flush_all()
        broker.close()
    return {
        f"dramatiq{prefix}_msg_ms": summary_ms(busy),
        f"dramatiq{prefix}_msg_idle_ms": summary_ms(idle),
        "dramatiq_idle_gap_ms": round(idle_gap_s * 1000),
    }


def measure(bed, *, samples=200, idle_samples=30):
    """Floors on the testbed's database and Redis (the stack may run, idle)."""
    return {
        **postgres_floors(bed.database_url, samples=samples),
        **redis_floor(bed.redis_url, samples=samples),
        **dramatiq_floor(bed.redis_url, samples=max(10, samples // 2), idle_samples=idle_samples),
        **dramatiq_floor(
            bed.redis_url, samples=max(10, samples // 2), idle_samples=idle_samples,
            broker_class=RedisBroker, prefix="_stock",
        ),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    from scripts.local_backends import ensure_database

    database_url, redis_url = bench_urls()
    backends = SimpleNamespace(database_url=database_url, redis_url=redis_url)  # no stack needed
    ensure_database(backends.database_url)
    print(json.dumps(measure(backends, samples=args.samples), indent=2))


if __name__ == "__main__":
    main()
