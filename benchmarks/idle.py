"""Idle cost: the CPU time the whole stack uses over a window with no work.

    python -m benchmarks.idle --seconds 60

One job runs to completion first (the stack works). The stack's processes
and the Redis server are counted (``benchmarks.cpu``);
the PostgreSQL backends connected to the stack's database are shown apart,
not in the total. Reported as % of one core: CPU seconds / wall seconds * 100.
"""

import time

from benchmarks.cpu import CpuMeter
from benchmarks.harness import case_main


def measure(bed, *, seconds=60.0, settle_s=2.0):
    # A stack that runs a job is a stack that works: a worker whose threads
    # died would look cheap while idle.
    bed.wait_finished([bed.submit()], timeout=60)
    time.sleep(settle_s)
    meter = CpuMeter(bed).start()
    time.sleep(seconds)
    usage = meter.stop()
    wall = usage["seconds"]
    stack_s = sum(usage["processes"].values())

    def pct(cpu_s):
        return round(100 * cpu_s / wall, 3)

    return {
        "seconds": round(wall, 1),
        "processes": usage["process_count"],
        "total_pct": pct(stack_s + usage["redis_s"]),
        "stack_pct": pct(stack_s),
        "redis_pct": pct(usage["redis_s"]),
        "postgres_backends_pct": pct(usage["postgres_s"]),
        "postgres_backends": usage["postgres_backends"],
        "per_process_pct": {name: pct(cpu_s) for name, cpu_s in usage["processes"].items()},
    }


def main(argv=None):
    case_main(measure, __doc__, argv=argv, seconds=60.0)


if __name__ == "__main__":
    main()
