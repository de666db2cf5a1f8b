"""Throughput: many business_plan jobs submitted at once, simulator at 0 ms.

    python -m benchmarks.throughput --jobs 200

The window runs from the first job's created_at to the last one's
finished_at, so it includes the submission: ``submit_seconds`` (first to
last created_at) shows how much of it the API's intake took.

Without ``held``, ``post_ms`` is the latency of every POST of the burst as
its client saw it (20 clients, while the first jobs already run), and
``accepted_per_s`` the jobs created per second of the burst.

``held=True`` measures execution alone: the jobs are created with the
workers stopped, then the workers start, and the window runs from the first
STEP_STARTED to the last finished_at.

Without ``held``, ``cpu_ms_per_step`` splits the CPU the machine spent on
the run by tier (workers, API, PostgreSQL, Redis, simulator, scheduler,
from ``benchmarks.cpu``), per step: where a step's cost goes and what
saturates first. ``cores_busy`` is their sum over the wall time.
"""

import argparse
import json
import time

from benchmarks.cpu import CpuMeter
from benchmarks.harness import reset, run_case, summary_ms, workers_held

STEPS_PER_JOB = {"business_plan": 4, "viral_video": 3}
# Clients submitting at once (the reference design was measured with 20).
CLIENTS = 20


def measure(bed, *, jobs, feature="business_plan", held=False, clients=CLIENTS):
    """Run ``jobs`` jobs on a running Testbed; returns the figures."""
    latencies = []
    if held:
        with workers_held(bed):
            job_ids = bed.submit_many(jobs, feature, threads=clients)
        bed.wait_finished(job_ids, timeout=600)
    else:
        meter = CpuMeter(bed).start()
        burst_started = time.perf_counter()
        job_ids = bed.submit_many(jobs, feature, threads=clients, latencies=latencies)
        burst_s = time.perf_counter() - burst_started
        bed.wait_finished(job_ids, timeout=600)
        usage = meter.stop()
    start = (
        "(SELECT min(created_at) FROM jobs_jobevent WHERE type = 'STEP_STARTED' AND job_id = ANY(%s::uuid[]))"
        if held
        else "min(created_at)"
    )
    ((seconds, submit_seconds),) = bed.sql(
        f"SELECT EXTRACT(EPOCH FROM max(finished_at) - {start}), "
        "EXTRACT(EPOCH FROM max(created_at) - min(created_at)) FROM jobs_job WHERE id = ANY(%s::uuid[])",
        [job_ids, job_ids] if held else [job_ids],
    )
    seconds = float(seconds)
    steps = jobs * STEPS_PER_JOB[feature]
    figures = {
        "jobs": jobs,
        "held": held,
        "steps": steps,
        "seconds": round(seconds, 3),
        "submit_seconds": round(float(submit_seconds), 3),
        "jobs_per_s": round(jobs / seconds, 1),
        "steps_per_s": round(steps / seconds, 1),
    }
    if not held:
        # The intake while the first jobs already run: every POST as its
        # client saw it, and the jobs accepted per second of the burst.
        figures["post_ms"] = summary_ms(latencies)
        figures["accepted_per_s"] = round(jobs / burst_s, 1)
        figures.update(cpu_per_step(usage, steps))
    return figures


def tier(process_name):
    """The tier a stack process belongs to: workers of every host count as one."""
    return "workers" if "worker_" in process_name else process_name


def cpu_per_step(usage, steps):
    by_tier = {"postgres": usage["postgres_s"], "redis": usage["redis_s"]}
    for name, cpu_s in usage["processes"].items():
        by_tier[tier(name)] = by_tier.get(tier(name), 0.0) + cpu_s
    total_s = sum(by_tier.values())
    return {
        "cpu_ms_per_step": {name: round(1000 * cpu_s / steps, 2) for name, cpu_s in by_tier.items()}
        | {"total": round(1000 * total_s / steps, 2)},
        "cores_busy": round(total_s / usage["seconds"], 2),
    }


def measure_sizes(bed, *, jobs=(200, 500)):
    """One run per size, the jobs of one finished before the next: {str(size): figures}."""
    results = {}
    for i, count in enumerate(jobs):
        if i:
            reset(bed)
        results[str(count)] = measure(bed, jobs=count)
    return results


def measure_execution(bed, *, jobs=500):
    return measure(bed, jobs=jobs, held=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--feature", default="business_plan", choices=sorted(STEPS_PER_JOB))
    parser.add_argument("--held", action="store_true", help="execution alone: queue every job, then start the workers")
    args = parser.parse_args(argv)
    print(json.dumps(run_case(measure, jobs=args.jobs, feature=args.feature, held=args.held), indent=2))


if __name__ == "__main__":
    main()
