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
    assert {row["key"] for row in rows} >= {"overhead_p50", "handoff_p95", "ws_p95", "idle_cpu", "floor_commit"}
    assert any(row["key"].startswith("throughput_") for row in rows)
    assert any(row["key"].startswith("post_") for row in rows)
    assert any(row["key"].startswith("cpu_") and row["key"].endswith("_workers") for row in rows)
    assert "Per-step overhead" in report.console_table({"cases": cases})
