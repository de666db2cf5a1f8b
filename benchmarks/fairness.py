"""Fair shares: a tenant's few jobs during another tenant's flood, against the same jobs alone.

    python -m benchmarks.fairness --flood 300 --few 10 --limit 4 --call_ms 200

fast_chat_llm gets ``limit`` slots and calls of ``call_ms``, so it is the
line every business_plan job waits in. Tenant B (an API key of its own)
first runs its ``few`` jobs alone: their latency, creation to completion,
is the baseline. Then tenant A creates ``flood`` jobs; once most of them
wait in fast_chat_llm's line, B creates the same ``few`` jobs again. The
figure is B's p95 during the flood over its p95 alone (the goal: at most
4); with one first-come line it is the flood's whole backlog.
"""

import time

from benchmarks.harness import case_main, percentile, wait_idle
from scripts.testbed import wait_until

SERVICE = "fast_chat_llm"


def latencies_s(bed, job_ids):
    rows = bed.sql(
        "SELECT EXTRACT(EPOCH FROM finished_at - created_at) FROM jobs_job WHERE id = ANY(%s::uuid[]) "
        "AND status = 'COMPLETED'",
        [list(job_ids)],
    )
    return [float(seconds) for (seconds,) in rows]


def waiting(bed, job_ids):
    rows = bed.sql(
        "SELECT count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) AND step_state = 'WAITING'", [list(job_ids)]
    )
    return rows[0][0]


def measure(bed, *, flood=300, few=10, limit=4, call_ms=200):
    bed.set_service(SERVICE, concurrency_limit=limit)
    bed.simulator.configure(latency={SERVICE: f"{call_ms}ms"})
    tenant_a, tenant_b = bed.new_api_key("bench-flood"), bed.new_api_key("bench-few")
    try:
        alone = bed.submit_many(few, "business_plan", threads=min(8, few), api_key=tenant_b)
        bed.wait_finished(alone, timeout=120)
        alone_s = latencies_s(bed, alone)

        started = time.monotonic()
        flooded = bed.submit_many(flood, "business_plan", threads=8, api_key=tenant_a)
        # B arrives once the flood is in line: behind it, in a first-come line.
        wait_until(lambda: waiting(bed, flooded) >= flood // 2, timeout=120, interval=0.1, message="the flood in line")
        in_line = waiting(bed, flooded)
        during = bed.submit_many(few, "business_plan", threads=min(8, few), api_key=tenant_b)
        bed.wait_finished(during, timeout=600)
        during_s = latencies_s(bed, during)
        bed.wait_finished(flooded, timeout=600)
        flood_s = latencies_s(bed, flooded)
        elapsed = time.monotonic() - started
    finally:
        wait_idle(bed)
    alone_p95, during_p95 = percentile(alone_s, 0.95), percentile(during_s, 0.95)
    return {
        "flood": flood,
        "few": few,
        "limit": limit,
        "call_ms": call_ms,
        "flood_in_line_when_b_arrived": in_line,
        "b_alone_p95_s": round(alone_p95, 3),
        "b_during_flood_p95_s": round(during_p95, 3),
        "b_ratio_p95": round(during_p95 / alone_p95, 2) if alone_p95 else None,
        "flood_p50_s": round(percentile(flood_s, 0.5), 3),
        "flood_max_s": round(max(flood_s), 3) if flood_s else None,
        "seconds": round(elapsed, 1),
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, flood=300, few=10, limit=4, call_ms=200)


if __name__ == "__main__":
    main()
