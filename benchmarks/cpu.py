"""CPU time used by the stack over a window, per tier, read from the OS.

- each process of the stack and its descendants (e.g. a Dramatiq master's
  worker processes): utime + stime from ``/proc/<pid>/stat``;
- the PostgreSQL backends connected to the stack's database (their pids from
  ``pg_stat_activity``), read the same way;
- the Redis server: ``used_cpu_sys + used_cpu_user`` of ``INFO cpu``. That is
  the whole server: on a shared Redis, other clients' work counts too.

A process or backend that starts inside the window counts from its start; one
that exits inside it is not counted.
"""

import os
import time

import redis

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


def _delta(before, after):
    """CPU seconds used between two process_tree_cpu readings, per name."""
    return {
        name: sum(seconds - before.get(name, {}).get(pid, 0.0) for pid, seconds in pids.items())
        for name, pids in after.items()
    }


def _redis_cpu(client):
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def _postgres_backends(bed):
    rows = bed.sql(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return {f"pg{pid}": pid for (pid,) in rows}


class CpuMeter:
    """``start()``, run the work, ``stop()``: CPU seconds by stack process, PostgreSQL and Redis."""

    def __init__(self, bed):
        self.bed = bed
        self.client = redis.Redis.from_url(bed.redis_url)

    def _roots(self):
        return {name: process.pid for name, process in self.bed.stack.processes.items() if process.poll() is None}

    def start(self):
        self._stack = process_tree_cpu(self._roots())
        self._postgres = process_tree_cpu(_postgres_backends(self.bed))
        self._redis = _redis_cpu(self.client)
        self._wall = time.monotonic()
        return self

    def stop(self):
        """{"seconds", "processes": {name: cpu_s}, "postgres_s", "postgres_backends", "redis_s"}."""
        wall = time.monotonic() - self._wall
        stack = process_tree_cpu(self._roots())
        backends = _postgres_backends(self.bed)
        postgres = process_tree_cpu(backends)
        redis_s = _redis_cpu(self.client) - self._redis
        self.client.close()
        return {
            "seconds": wall,
            "processes": _delta(self._stack, stack),
            "process_count": sum(len(pids) for pids in stack.values()),
            "postgres_s": sum(_delta(self._postgres, postgres).values()),
            "postgres_backends": len(backends),
            "redis_s": redis_s,
        }
