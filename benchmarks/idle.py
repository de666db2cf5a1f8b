"""Idle cost: the CPU time the whole stack uses over a window with no work.

    python -m benchmarks.idle --seconds 60

- each process of the stack and its descendants (e.g. a Dramatiq master's
  worker processes): utime + stime from ``/proc/<pid>/stat``, delta over the
  window; a process that exits inside the window is not counted;
- the Redis server: ``used_cpu_sys + used_cpu_user`` of ``INFO cpu``, delta.
  That is the whole server: on a shared Redis, other clients' work counts too;
- shown apart, not in the total: the PostgreSQL backends connected to the
  stack's database (their pids from ``pg_stat_activity``), read the same way.

Reported as % of one core: CPU seconds / wall seconds * 100.
"""

import os
import time

import redis

from benchmarks.harness import case_main, run_case

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid):
    """(ppid, CPU seconds) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "; fields[0] is field 3 of proc(5)
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _all_processes():
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat:
                table[int(entry)] = stat
    return table


def process_tree_cpu(roots):
    """CPU seconds per pid of each root and its descendants: {name: {pid: seconds}}."""
    table = _all_processes()
    children = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    tree = {}
    for name, root in roots.items():
        pids, pending = {}, [root]
        while pending:
            pid = pending.pop()
            if pid in table:
                pids[pid] = table[pid][1]
                pending.extend(children.get(pid, []))
        tree[name] = pids
    return tree


def _redis_cpu(client):
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def _postgres_backends(bed):
    rows = bed.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return {f"pg{pid}": pid for (pid,) in rows}


def _delta(before, after):
    """CPU seconds used between two process_tree_cpu readings (processes alive at both)."""
    return {
        name: sum(after[name][pid] - seconds for pid, seconds in pids.items() if pid in after.get(name, {}))
        for name, pids in before.items()
    }


def measure(bed, *, seconds=60.0, settle_s=2.0):
    time.sleep(settle_s)
    client = redis.Redis.from_url(bed.redis_url)
    roots = {name: process.pid for name, process in bed.stack.processes.items() if process.poll() is None}
    backends = _postgres_backends(bed)

    stack_before, pg_before = process_tree_cpu(roots), process_tree_cpu(backends)
    redis_before, wall_before = _redis_cpu(client), time.monotonic()
    time.sleep(seconds)
    stack_after, pg_after = process_tree_cpu(roots), process_tree_cpu(backends)
    redis_after, wall = _redis_cpu(client), time.monotonic() - wall_before
    client.close()

    per_process = _delta(stack_before, stack_after)
    stack_s = sum(per_process.values())
    redis_s = redis_after - redis_before
    postgres_s = sum(_delta(pg_before, pg_after).values())

    def pct(cpu_s):
        return round(100 * cpu_s / wall, 3)

    return {
        "seconds": round(wall, 1),
        "processes": sum(len(pids) for pids in stack_before.values()),
        "total_pct": pct(stack_s + redis_s),
        "stack_pct": pct(stack_s),
        "redis_pct": pct(redis_s),
        "postgres_backends_pct": pct(postgres_s),
        "postgres_backends": len(backends),
        "per_process_pct": {name: pct(cpu_s) for name, cpu_s in per_process.items()},
    }


def run(*, seconds=60.0):
    return run_case(measure, seconds=seconds)


def main(argv=None):
    case_main(measure, __doc__, argv=argv, seconds=60.0)


if __name__ == "__main__":
    main()
