"""The benchmark suite runs: every case of `make bench`, at its quick sizes, on
the real stack. Only that each case returns numbers; timings are never
asserted (the machine may be busy)."""

from urllib.parse import urlsplit

import pytest

from benchmarks import report, run_all
from benchmarks.harness import bench_testbed
from scripts.testbed import with_database

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def bed(settings, tmp_path):
    database = urlsplit(settings.DATABASE_URL).path.lstrip("/") or "cao"
    with bench_testbed(
        database_url=with_database(settings.DATABASE_URL, f"{database}_bench_smoke"),
        redis_url=settings.REDIS_URL,  # the tests' own Redis database
    ) as bed:
        yield bed


def test_every_case_runs_and_returns_numbers(bed):
    cases = run_all.run_cases(bed, run_all.CASES, sizes=run_all.QUICK, log=lambda line: None)

    assert {name: case.get("error") for name, case in cases.items() if "error" in case} == {}
    rows = report.figures(cases)
    missing = [row["label"] for row in rows if not isinstance(row["value"], (int, float))]
    assert missing == []
    assert {row["key"] for row in rows} >= {
        "overhead_p50", "gap_p50", "handoff_p95", "ws_p95", "ws_cpu_per_event", "ws_burst_p95", "ws_burst_terminal_p95",
        "ws_burst_gapless", "idle_cpu", "floor_commit", "inflight_calls", "inflight_pg", "rate_busiest", "rate_over",
        "fair_alone", "fair_during", "fair_ratio",
    }
    assert any(row["key"].startswith("burst_") and row["key"].endswith("_post_p50") for row in rows)
    assert any(row["key"].startswith("throughput_") for row in rows)
    assert any(row["key"].startswith("post_") for row in rows)
    assert any(row["key"].startswith("cpu_") and row["key"].endswith("_workers") for row in rows)
    assert "Per-step overhead" in report.console_table({"cases": cases})


@pytest.mark.parametrize(
    "module, args, count_key, count, per_key",
    [
        ("benchmarks.engine_cpu", ["--jobs", "2", "--warmup", "1"], "steps", 8, "step"),
        ("benchmarks.api_cpu", ["--requests", "5"], "requests", 5, "request"),
    ],
)
def test_the_in_process_cpu_benchmarks_run(settings, module, args, count_key, count, per_key):
    import json
    import os
    import subprocess
    import sys

    from scripts.stack import ROOT

    database = urlsplit(settings.DATABASE_URL).path.lstrip("/") or "cao"
    env = {
        **os.environ,
        "DATABASE_URL": settings.DATABASE_URL,
        "CAO_BENCH_DATABASE": f"{database}_{module.rpartition('.')[2]}",
        "CAO_BENCH_REDIS_DB": urlsplit(settings.REDIS_URL).path.lstrip("/") or "0",  # the tests' own
    }
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures[count_key] == count
    assert figures[f"cpu_ms_per_{per_key}"] > 0 and figures[f"wall_ms_per_{per_key}"] > 0


def test_the_busiest_window_counts_the_most_starts_of_any_span():
    from benchmarks.rate_limit import busiest_window

    assert busiest_window([], 60) == 0
    assert busiest_window([0, 10, 59.9, 60, 61, 130], 60) == 4  # 10, 59.9, 60, 61
    assert busiest_window([0, 1, 2], 1) == 1
