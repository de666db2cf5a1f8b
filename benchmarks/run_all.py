"""The benchmark suite (`make bench`): one real stack, every case, one report.

    python -m benchmarks.run_all                       # full sizes, ~5 minutes
    python -m benchmarks.run_all --quick               # small sizes, idle 5 s
    python -m benchmarks.run_all --only throughput,handoff
    python -m benchmarks.run_all --app-root /tmp/cao-before --save-as before
    python -m benchmarks.run_all --only idle --private-redis --save-as idle-private

Starts the stack of ``--app-root`` (default: this checkout) as ``make serve``
does, on the benchmark database and Redis db (``$CAO_BENCH_DATABASE``,
``$CAO_BENCH_REDIS_DB``; the database is dropped and migrated afresh), runs
the cases in order with a reset between them (no job left, simulator back to
0 ms, empty job tables), prints the table, writes ``.run/bench/<stamp>.json``
and ``.run/bench/<save-as>.json``, and regenerates the figures section of
docs/PERFORMANCE.md from ``before.json`` and ``latest.json``.

``--private-redis`` runs the stack on a redis-server of its own (free port,
no persistence) instead of the shared one, so the idle case's Redis CPU is
the stack's alone.
"""

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from benchmarks import (
    fairness, floors, handoff, idle, inflight, overhead, post_latency, rate_limit, recovery, report, throughput,
    ws_latency,
)
from benchmarks.harness import bench_testbed, bench_urls, reset
from scripts.stack import ROOT
from scripts.testbed import PrivateRedis

# In run order: idle first, on a stack that has done nothing yet; floors
# before the load; the heaviest loads last.
# Recovery runs on a stack of its own (it kills workers and Redis).
CASES = (
    "idle", "floors", "overhead", "handoff", "ws", "post", "throughput", "ws_burst", "execution", "inflight", "rate",
    "fairness", "recovery",
)

FULL = {
    "idle": {"seconds": 60},
    "floors": {"samples": 200, "idle_samples": 30},
    "overhead": {"jobs": 30, "warmup": 3},
    "handoff": {"jobs": 20},
    "ws": {"jobs": 50},
    "ws_burst": {"jobs": 200},
    "post": {"rates": (10, 50), "seconds": 10},
    "throughput": {"jobs": (200, 500)},
    "execution": {"jobs": 500},
    "inflight": {"jobs": 330, "limit": 300, "call_s": 2.0},
    "rate": {"rpm": 120, "seconds": 75.0},
    "fairness": {"flood": 300, "few": 10, "limit": 4, "call_ms": 200},
    "recovery": {"jobs": 10, "call_s": 2.0, "redis_jobs": 30, "timeout_s": 240},
}
QUICK = {
    "idle": {"seconds": 5, "settle_s": 1},
    "floors": {"samples": 30, "idle_samples": 5},
    "overhead": {"jobs": 5, "warmup": 1, "pause_s": 0.2},
    "handoff": {"jobs": 6},
    "ws": {"jobs": 5},
    "ws_burst": {"jobs": 10, "clients": 5},
    "post": {"rates": (20,), "seconds": 2, "warmup_s": 0.5},
    "throughput": {"jobs": (20,)},
    "execution": {"jobs": 20},
    "inflight": {"jobs": 40, "limit": 30, "call_s": 1.0},
    "rate": {"rpm": 4, "seconds": 3.0},
    "fairness": {"flood": 20, "few": 3, "limit": 2, "call_ms": 50},
    # One worker kill: the quick run shows the case works; tests/test_recovery_e2e.py kills each queue's.
    "recovery": {"jobs": 3, "call_s": 1.0, "redis_jobs": 6, "timeout_s": 120, "queues": ("medium",)},
}


MEASURES = {
    "idle": idle.measure,
    "floors": floors.measure,
    "overhead": overhead.measure,
    "handoff": handoff.measure,
    "ws": ws_latency.measure,
    "ws_burst": ws_latency.measure_burst,
    "post": post_latency.measure,
    "throughput": throughput.measure_sizes,
    "execution": throughput.measure_execution,
    "inflight": inflight.measure,
    "rate": rate_limit.measure,
    "fairness": fairness.measure,
    "recovery": recovery.measure,
}


def run_cases(bed, names=CASES, *, sizes=FULL, log=print):
    """Run the named cases on a started Testbed; returns {case: result or {"error": ...}}."""
    results = {}
    for name in names:
        log(f"[bench] {name} {sizes[name]} ...")
        started = time.monotonic()
        try:
            results[name] = MEASURES[name](bed, **sizes[name])
        except Exception as error:  # one failed case must not cost the others
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        log(f"[bench] {name} done in {time.monotonic() - started:.1f} s")
        reset(bed)
    return results


def _git(root, *args):
    try:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _commit(root):
    commit = _git(root, "rev-parse", "--short", "HEAD")
    return commit + ("+dirty" if _git(root, "status", "--porcelain", "--untracked-files=no") else "")


def _machine():
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}, {platform.system()} {platform.release()}"


def _loadavg():
    return round(os.getloadavg()[0], 2)


def drop_database(database_url):
    """Drop the benchmark database so the checkout under test migrates an empty one."""
    import psycopg2

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    conn = psycopg2.connect(
        dbname="postgres", host=parts.hostname or "127.0.0.1", port=parts.port or 5432,
        user=parts.username or "postgres", password=parts.password, connect_timeout=5,
    )
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run), idle 5 s")
    parser.add_argument("--only", default="", help=f"comma-separated cases among {','.join(CASES)}")
    parser.add_argument("--app-root", type=Path, default=ROOT, help="checkout whose stack to run (default: this one)")
    parser.add_argument("--save-as", default="latest", help="also write .run/bench/NAME.json (default latest)")
    parser.add_argument("--no-doc", action="store_true", help="do not regenerate docs/PERFORMANCE.md")
    parser.add_argument(
        "--private-redis", action="store_true", help="run the stack on a redis-server of its own (idle CPU attribution)"
    )
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.only.split(",") if name.strip()] or list(CASES)
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose among {', '.join(CASES)}")
    names = [name for name in CASES if name in names]
    app_root = args.app_root.resolve()
    if not (app_root / "manage.py").exists():
        parser.error(f"{app_root} is not a checkout of the gateway (no manage.py)")
    sizes = QUICK if args.quick else FULL

    started_at, started = datetime.now(timezone.utc), time.monotonic()
    meta = {
        "stamp": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "date": started_at.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "app_root": str(app_root),
        "app_commit": _commit(app_root),
        "bench_commit": _commit(ROOT),
        "quick": args.quick,
        "cases": names,
        "sizes": {name: sizes[name] for name in names},
        "loadavg": {"start": _loadavg()},
    }
    print(f"[bench] stack of {app_root} ({meta['app_commit']}), {meta['machine']}", flush=True)
    database_url, redis_url = bench_urls()
    drop_database(database_url)
    private_redis = PrivateRedis().start() if args.private_redis else None
    if private_redis:
        redis_url = private_redis.url(0)
    meta["redis"] = "private redis-server" if private_redis else f"shared, {redis_url}"
    try:
        with bench_testbed(root=app_root, redis_url=redis_url) as bed:
            print(f"[bench] stack up, logs in {bed.log_dir}", flush=True)
            cases = run_cases(bed, names, sizes=sizes, log=lambda line: print(line, flush=True))
    finally:
        if private_redis:
            private_redis.close()
    meta["loadavg"]["end"] = _loadavg()
    meta["duration_s"] = round(time.monotonic() - started, 1)
    run = {"meta": meta, "cases": cases}

    print()
    print(report.console_table(run))
    print("\n".join(["", *report.details(cases)]))
    path = report.save(run, name=args.save_as)
    print(f"\n[bench] wrote {path} and {path.with_name(args.save_as + '.json')}")
    if not args.no_doc and report.update_doc():
        print(f"[bench] updated {report.DOC}")
    return 1 if any("error" in case for case in cases.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
