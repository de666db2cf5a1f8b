"""Throughput: many business_plan jobs submitted at once, simulator at 0 ms.

    python -m benchmarks.throughput --jobs 200
"""

import argparse
import json

from benchmarks.harness import bench_testbed

STEPS_PER_JOB = {"business_plan": 4, "viral_video": 3}


def measure(bed, *, jobs, feature="business_plan"):
    """Run ``jobs`` jobs on a running Testbed; returns the figures."""
    job_ids = bed.submit_many(jobs, feature, threads=16)
    bed.wait_finished(job_ids, timeout=600)
    ((seconds,),) = bed.sql(
        "SELECT EXTRACT(EPOCH FROM max(finished_at) - min(created_at)) FROM jobs_job WHERE id = ANY(%s::uuid[])",
        [job_ids],
    )
    seconds = float(seconds)
    steps = jobs * STEPS_PER_JOB[feature]
    return {
        "jobs": jobs,
        "steps": steps,
        "seconds": round(seconds, 3),
        "jobs_per_s": round(jobs / seconds, 1),
        "steps_per_s": round(steps / seconds, 1),
    }


def run(*, jobs=200, feature="business_plan"):
    with bench_testbed() as bed:
        return measure(bed, jobs=jobs, feature=feature)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--feature", default="business_plan", choices=sorted(STEPS_PER_JOB))
    args = parser.parse_args(argv)
    print(json.dumps(run(jobs=args.jobs, feature=args.feature), indent=2))


if __name__ == "__main__":
    main()
