"""Which gateway processes are alive: heartbeats in Redis, and certain death on one host.

A lease alone says too little about its holder: it is renewed every
lease_ttl_s / 3 and lapses only after lease_ttl_s (660 s for a video call),
so a killed worker's slots and steps would wait that long. Instead each
process that holds leases beats every CAO_WORKER_HEARTBEAT_S:

    cao:{procs}        ZSET  process id -> expiry, ms (server clock)
    cao:{procs}:info   HASH  process id -> its identity (JSON)

and the limiter records which process owns each lease. A process whose
expiry passed is dead (or stalled longer than CAO_WORKER_DEAD_AFTER_S,
which the trade-off in docs/RELIABILITY.md accepts): the scheduler reclaims
its slots, re-runs its steps and returns its broker messages at once.

A process that starts can do better than wait for the expiry: a process of
the same host (same boot and PID namespace) whose PID is gone, or runs
another program, is certainly dead, and is declared so on the spot.

A process that stops holding leases retires its entry after one heartbeat
period; only an entry that lapses while present means death.
"""

import json
import logging
import os
import socket
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PROCS_KEY = "cao:{procs}"
INFO_KEY = "cao:{procs}:info"
# The scheduler's list of wake-up requests (a worker booted, Redis came back).
WAKE_KEY = "cao:{procs}:wake"
LUA_DIR = Path(__file__).resolve().parent / "lua"


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _start_ticks(pid):
    """When process ``pid`` started (clock ticks since boot), or None if there is none."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) may hold spaces: count fields after its ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace():
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


@dataclass(frozen=True)
class ProcessIdentity:
    """Who a process is, precisely enough to tell, on its own host, that it died."""

    id: str
    host: str
    pid: int
    boot_id: str | None = None
    pid_namespace: int | None = None
    started: int | None = None
    # The Dramatiq Redis broker's id of this process: its fetched messages
    # are filed under it, and go back to their queue when it is declared dead.
    broker_id: str | None = None

    @classmethod
    def current(cls, *, broker_id=None):
        pid = os.getpid()
        return cls(
            id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=pid,
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_namespace=_pid_namespace(),
            started=_start_ticks(pid),
            broker_id=broker_id,
        )

    def to_json(self):
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text):
        fields = json.loads(text)
        return cls(**{name: fields.get(name) for name in cls.__dataclass_fields__})

    def certainly_dead(self):
        """True only when this process provably no longer runs: it shares our kernel
        boot and PID namespace, and its PID is gone or belongs to a later process."""
        if not self.boot_id or self.boot_id != _read("/proc/sys/kernel/random/boot_id"):
            return False
        if self.pid_namespace is None or self.pid_namespace != _pid_namespace():
            return False
        return _start_ticks(self.pid) != self.started


class Liveness:
    """Heartbeats and death certificates, on one ``redis.Redis`` client (decoded responses)."""

    def __init__(self, client):
        self.client = client
        self._beat = client.register_script((LUA_DIR / "liveness_beat.lua").read_text())
        self._check = client.register_script((LUA_DIR / "liveness_check.lua").read_text())

    def beat(self, identity, *, dead_after_s):
        """Say ``identity`` is alive for ``dead_after_s`` more seconds."""
        self._beat(keys=[PROCS_KEY, INFO_KEY], args=[identity.id, int(dead_after_s * 1000), identity.to_json()])

    def retire(self, identity):
        """Withdraw ``identity``: it holds no lease any more (or it exits cleanly)."""
        pipeline = self.client.pipeline(transaction=True)
        pipeline.zrem(PROCS_KEY, identity.id)
        pipeline.hdel(INFO_KEY, identity.id)
        pipeline.execute()

    def check(self):
        """``(run_id of the Redis server, identities whose heartbeat lapsed)``."""
        run_id, dead = self._check(keys=[PROCS_KEY, INFO_KEY])
        return run_id, [_identity(process_id, info) for process_id, info in _pairs(dead)]

    def declare_dead(self, process_ids):
        """Make the next check see these processes as dead, without waiting for their expiry."""
        if process_ids:
            self.client.zadd(PROCS_KEY, {process_id: 0 for process_id in process_ids}, xx=True)

    def forget(self, process_ids):
        """Remove processes whose death has been handled."""
        if process_ids:
            pipeline = self.client.pipeline(transaction=True)
            pipeline.zrem(PROCS_KEY, *process_ids)
            pipeline.hdel(INFO_KEY, *process_ids)
            pipeline.execute()

    def declare_dead_on_this_host(self):
        """Declare dead every registered process of this host that certainly died; return their ids."""
        dead = [
            process_id
            for process_id, info in self.client.hgetall(INFO_KEY).items()
            if _identity(process_id, info).certainly_dead()
        ]
        self.declare_dead(dead)
        return dead

    def wake_scheduler(self, reason):
        """Ask the scheduler for a recovery pass now (it waits on this list between ticks)."""
        pipeline = self.client.pipeline(transaction=False)
        pipeline.lpush(WAKE_KEY, reason)
        pipeline.ltrim(WAKE_KEY, 0, 15)
        pipeline.execute()

    def wait_for_wake(self, timeout_s):
        """Block until a wake-up request or ``timeout_s``; returns the reason or None."""
        item = self.client.blpop([WAKE_KEY], timeout=timeout_s)
        return item[1] if item else None


def _pairs(flat):
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _identity(process_id, info):
    try:
        return ProcessIdentity.from_json(info)
    except (TypeError, ValueError):
        return ProcessIdentity(id=process_id, host="?", pid=-1)


class ProcessHeartbeat:
    """This process's heartbeat, as the lease keeper sends it while the process holds leases."""

    def __init__(self, liveness, identity, *, period_s, dead_after_s):
        self.liveness = liveness
        self.identity = identity
        self.period_s = period_s
        self.dead_after_s = dead_after_s

    @property
    def owner(self):
        return self.identity.id

    def beat(self):
        self.liveness.beat(self.identity, dead_after_s=self.dead_after_s)

    def retire(self):
        self.liveness.retire(self.identity)
