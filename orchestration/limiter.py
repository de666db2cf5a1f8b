"""Fair, crash-safe per-service concurrency limiter: a semaphore in Redis.

Per service, under one hash tag (``cao:lim:{<service>}:``): ``holders`` (ZSET
member -> lease expiry), ``waiters`` (ZSET member -> arrival ticket),
``granted`` (ZSET member -> reservation expiry, the waiters a freed slot was
handed to), ``payloads`` (HASH member -> message to dispatch on hand-off)
and ``owners`` (HASH holder -> the process running its call).

Invariants, kept by Lua scripts in ``lua/`` (one atomic call per operation):

- A grant never raises |holders| + |granted| above the limit. Only a lowered
  limit or :meth:`Limiter.renew` of a lost lease (a call that really is in
  flight) can leave more, and then nothing is granted until it drops below.
- ``granted`` is a subset of ``waiters``; no member both holds and waits.
- Waiters are granted strictly in arrival order; a granted waiter keeps its
  place until it acquires, so a lapsed reservation is simply granted again.
- Leases and reservations expire by the Redis server's clock; every script
  that can grant first drops expired entries, so a dead holder's slot returns
  at the next acquire/release even without a reaper.

A caller that finds no slot is parked and returns at once; a release returns
the parked messages to dispatch (hand-offs), so nobody polls. The limit is
passed on every call, so a changed limit takes effect at the next call.

If Redis loses the keys while calls are in flight, acquire grants nothing
until a census has re-seeded ``holders`` from the caller's system of record
(``census`` argument of :meth:`Limiter.acquire`), so the limit holds across
a Redis restart too. A census is valid for one run of the Redis server (its
``run_id``): a restart from a snapshot, which restores the census key but
not the holders written since, takes a new one.

A holder's owner lets :meth:`Limiter.reclaim` free the slots of a process
known to be dead (its heartbeat lapsed) at once, instead of at lease expiry.
"""

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"


@dataclass(frozen=True)
class Acquisition:
    """The outcome of :meth:`Limiter.acquire`.

    ``granted``: the member holds a slot. ``position``: its 0-based rank
    among the waiters when parked, else None. ``handoffs``: payloads of
    other waiters granted by this call; the caller must dispatch them.
    """

    granted: bool
    position: int | None
    handoffs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Holder:
    member: str
    expires_at: float  # UNIX seconds, server clock


@dataclass(frozen=True)
class Waiter:
    member: str
    since: float  # UNIX seconds, server clock


@dataclass(frozen=True)
class Occupancy:
    """A consistent snapshot of one service; ``now`` is the server time."""

    now: float
    holders: tuple[Holder, ...]
    granted: tuple[Holder, ...]  # reservations: member + reservation expiry
    waiters: tuple[Waiter, ...]  # in queue order, granted ones included

    @property
    def in_use(self) -> int:
        """Slots taken: leases plus reservations."""
        return len(self.holders) + len(self.granted)

    @property
    def waiting(self) -> int:
        """Waiters without a slot reserved for them."""
        return len(self.waiters) - len(self.granted)

    @property
    def oldest_wait_s(self) -> float:
        """Age of the head of the queue, 0.0 when nobody waits."""
        if not self.waiters:
            return 0.0
        return max(0.0, self.now - self.waiters[0].since)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def _texts(values):
    return tuple(_text(v) for v in values)


def _pairs(flat):
    return [(_text(flat[i]), float(flat[i + 1])) for i in range(0, len(flat), 2)]


def _ms(seconds: float) -> int:
    if seconds <= 0:
        raise ValueError(f"ttl must be positive, got {seconds!r}")
    return max(1, round(seconds * 1000))


def _limit(limit: int) -> int:
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit!r}")
    return int(limit)


class Limiter:
    """Per-service semaphore on a ``redis.Redis`` client.

    Works with ``decode_responses`` on or off. ``grant_ttl_s`` is how long a
    hand-off reserves a slot for its waiter: if the dispatched message is
    lost, the reservation lapses and the next pump dispatches it again.
    """

    _operations = (
        "acquire", "census", "renew", "release", "redispatch", "reap", "reclaim", "locate", "occupancy",
    )

    def __init__(self, client, *, prefix: str = "cao:lim", grant_ttl_s: float = 30.0):
        self.client = client
        self.prefix = prefix
        self.grant_ttl_ms = _ms(grant_ttl_s)
        common = (LUA_DIR / "limiter_common.lua").read_text()
        self._scripts = {
            name: client.register_script(common + (LUA_DIR / f"limiter_{name}.lua").read_text())
            for name in self._operations
        }

    def keys(self, service: str) -> list[str]:
        """The script KEYS of one service, in the order the scripts expect."""
        base = f"{self.prefix}:{{{service}}}:"
        return [
            base + name
            for name in ("holders", "granted", "waiters", "payloads", "ticket", "census", "owners", "moved")
        ]

    def _call(self, name, service, *args):
        return self._scripts[name](keys=self.keys(service), args=args)

    def acquire(
        self, service: str, member: str, *, limit: int, ttl_s: float, payload: str, census=None, owner: str = ""
    ) -> Acquisition:
        """Take a slot for ``member`` or park it with ``payload``; never blocks.

        Idempotent: a holder gets its lease refreshed, a parked member keeps
        its place (its payload is replaced), a granted member takes its slot.

        ``census``: a callable returning the members whose calls are in
        flight for ``service`` by the system of record. It is called only
        when Redis has no census for the service (new, or its data lost),
        and those members are counted as holders before anything is granted.

        ``owner``: the id of the calling process, recorded with the lease so
        :meth:`reclaim` can free it if that process dies.
        """
        args = (member, _limit(limit), _ms(ttl_s), self.grant_ttl_ms, payload, owner)
        granted, position, handoffs = self._call("acquire", service, *args)
        if int(granted) == -1:
            seeded = self.take_census(service, census() if census else (), ttl_s=ttl_s)
            if seeded:
                logger.warning(
                    "The limiter of %s had no state (Redis restarted or lost its data); "
                    "counted %s calls in flight before granting.", service, seeded,
                )
            granted, position, handoffs = self._call("acquire", service, *args)
            if int(granted) == -1:  # lost again within a round trip: say so, retry the message
                raise RuntimeError(f"The limiter state of {service} keeps disappearing.")
        return Acquisition(
            granted=bool(granted),
            position=None if granted else int(position),
            handoffs=_texts(handoffs),
        )

    def take_census(self, service: str, members, *, ttl_s: float) -> int:
        """Seed ``holders`` with ``members`` unless a census exists; return how many were added."""
        return int(self._call("census", service, _ms(ttl_s), *members))

    def renew(self, service: str, member: str, *, ttl_s: float, owner: str = "") -> bool:
        """Extend a lease; False if it was lost (it is re-added all the same, with its owner)."""
        return bool(self._call("renew", service, member, _ms(ttl_s), owner))

    def release(self, service: str, member: str, *, limit: int) -> tuple[str, ...]:
        """Give up a lease, reservation or place in the queue; return hand-offs."""
        return _texts(self._call("release", service, member, _limit(limit), self.grant_ttl_ms))

    def redispatch_waiters(self, service: str, *, limit: int) -> tuple[str, ...]:
        """Hand free slots (dead holders', lapsed reservations') to waiters."""
        return _texts(self._call("redispatch", service, _limit(limit), self.grant_ttl_ms))

    def redispatch_many(self, services) -> tuple[str, ...]:
        """:meth:`redispatch_waiters` for many ``(service, limit)`` pairs, in one round trip."""
        if not services:
            return ()
        pipeline = self.client.pipeline(transaction=False)
        for service, limit in services:
            self._scripts["redispatch"](keys=self.keys(service), args=(_limit(limit), self.grant_ttl_ms), client=pipeline)
        return tuple(_text(payload) for handoffs in pipeline.execute() for payload in handoffs)

    def reclaim(self, service: str, dead_owners, *, limit: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Drop the leases of processes known to be dead; return (released members, hand-offs)."""
        released, handoffs = self._call("reclaim", service, _limit(limit), self.grant_ttl_ms, *dead_owners)
        return _texts(released), _texts(handoffs)

    def last_moved(self, service: str) -> float | None:
        """When a slot of ``service`` was last granted (UNIX seconds, server clock), or None."""
        value = self.client.get(self.keys(service)[7])
        return int(value) / 1000 if value is not None else None

    def reap(self, service: str) -> int:
        """Drop expired leases and reservations; return how many."""
        return int(self._call("reap", service))

    def locate(self, service: str, member: str) -> str | None:
        """``"holder"``, ``"granted"``, ``"waiter"`` or None (expired = absent)."""
        return _text(self._call("locate", service, member))

    def locate_many(self, pairs) -> list[str | None]:
        """:meth:`locate` for many ``(service, member)`` pairs, in one round trip."""
        if not pairs:
            return []
        pipeline = self.client.pipeline(transaction=False)
        for service, member in pairs:
            self._scripts["locate"](keys=self.keys(service), args=(member,), client=pipeline)
        return [_text(place) for place in pipeline.execute()]

    def occupancy(self, service: str) -> Occupancy:
        now_ms, holders, granted, waiters = self._call("occupancy", service)
        return Occupancy(
            now=int(now_ms) / 1000,
            holders=tuple(Holder(m, ms / 1000) for m, ms in _pairs(holders)),
            granted=tuple(Holder(m, ms / 1000) for m, ms in _pairs(granted)),
            waiters=tuple(Waiter(m, us / 1_000_000) for m, us in _pairs(waiters)),
        )


@dataclass(eq=False)
class _Lease:
    service: str
    member: str
    ttl_s: float
    due: float
    renewing: bool = False

    @property
    def period(self) -> float:
        return self.ttl_s / 3


class LeaseKeeper:
    """Renews the leases of in-flight calls from one daemon thread.

    Each tracked lease is renewed every ttl_s / 3, so a live holder survives
    two failed renewals in a row; only a dead process stops renewing. The
    thread sleeps on a condition until the next renewal is due and does not
    wake at all while nothing is tracked. Renewal errors are logged and
    retried at the next due time, never raised into the call.

    With a ``heartbeat`` (``orchestration.liveness.ProcessHeartbeat``), the
    same thread also says the process is alive every ``heartbeat.period_s``
    while it holds a lease, and retires the process one period after its
    last lease; leases are renewed under ``heartbeat.owner``.

    ``autostart=False`` leaves renewals to explicit :meth:`tick` calls, so a
    test driving ``clock`` by hand does not race the thread.
    """

    def __init__(self, limiter: Limiter, *, clock=time.monotonic, autostart: bool = True, heartbeat=None):
        self.limiter = limiter
        self.clock = clock
        self.autostart = autostart
        self.heartbeat = heartbeat
        self.wakeups = 0  # times the thread woke up; lets tests see it idle
        self.idle = False  # the thread waits for track() with no deadline
        self._cond = threading.Condition()
        self._leases: set[_Lease] = set()
        self._thread = None
        self._closed = False
        self._beat_due = None  # when the heartbeat is next due; None: nothing to say
        self._beating = False
        self._alive_until = None  # until when our last beat vouches for us; None: retired

    @property
    def owner(self) -> str:
        """The id recorded with this process's leases ("" without a heartbeat)."""
        return self.heartbeat.owner if self.heartbeat else ""

    def ensure_alive(self) -> None:
        """Beat now, in the caller's thread, unless a recent beat still vouches for this process.

        Called before taking a slot: a lease must never be owned by a process
        that is not registered, or its death would go unnoticed until the
        lease expires. Cheap while the process is busy (no round trip).
        """
        if not self.heartbeat:
            return
        with self._cond:
            now = self.clock()
            if self._alive_until is not None and self._alive_until - now > self.heartbeat.dead_after_s / 2:
                return
        if self._beat(busy=True):
            with self._cond:
                now = self.clock()
                self._alive_until = now + self.heartbeat.dead_after_s
                if self._beat_due is None or self._beat_due < now:
                    self._beat_due = now + self.heartbeat.period_s
                self._ensure_thread()
                self._cond.notify_all()

    @contextmanager
    def keep(self, service: str, member: str, ttl_s: float):
        """Keep ``member``'s lease alive for the duration of the block."""
        lease = self.track(service, member, ttl_s)
        try:
            yield lease
        finally:
            self.untrack(lease)

    def track(self, service: str, member: str, ttl_s: float) -> _Lease:
        lease = _Lease(service, member, ttl_s, due=self.clock() + ttl_s / 3)
        with self._cond:
            self._leases.add(lease)
            if self.heartbeat and self._beat_due is None:
                self._beat_due = self.clock()  # say so at once: this process now holds a slot
            self._ensure_thread()
            self._cond.notify_all()
        return lease

    def untrack(self, lease: _Lease) -> None:
        with self._cond:
            self._leases.discard(lease)
            self._cond.notify_all()
            # A renewal already on the wire could land after the caller's
            # release and re-add the lease as a phantom holder, so wait it
            # out. Bounded: past ttl_s a phantom would expire by itself anyway.
            deadline = time.monotonic() + lease.ttl_s
            while lease.renewing and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)

    @property
    def tracked(self) -> int:
        with self._cond:
            return len(self._leases)

    def tick(self) -> float | None:
        """Renew every due lease (and beat when due); return seconds to the next due, None if idle."""
        with self._cond:
            now = self.clock()
            due = [lease for lease in self._leases if lease.due <= now and not lease.renewing]
            for lease in due:
                lease.renewing = True
            beat = self._beat_due is not None and self._beat_due <= now and not self._beating
            busy = bool(self._leases)
            self._beating = self._beating or beat
        # Network calls happen outside the lock so keep() never waits on them,
        # except to untrack the very lease being renewed.
        beat_ok = self._beat(busy) if beat else True
        beaten_at = self.clock()
        for lease in due:
            try:
                if not self.limiter.renew(lease.service, lease.member, ttl_s=lease.ttl_s, owner=self.owner):
                    logger.warning(
                        "Lease of %s on %s was lost (Redis state lost or renewals late); re-added.",
                        lease.member,
                        lease.service,
                    )
            except Exception:
                logger.warning(
                    "Could not renew the lease of %s on %s; retrying at the next tick.",
                    lease.member,
                    lease.service,
                    exc_info=True,
                )
        with self._cond:
            now = self.clock()
            for lease in due:
                lease.renewing = False
                lease.due = now + lease.period
            if beat:
                self._beating = False
                if beat_ok:
                    self._alive_until = beaten_at + self.heartbeat.dead_after_s if busy else None
                # Busy (or a retirement that failed): beat again in a period.
                # Retired: nothing to say until the next lease is tracked.
                # Retired while a slot was being taken: say so again at once.
                if not busy and beat_ok and not self._leases:
                    self._beat_due = None
                elif not busy and self._leases:
                    self._beat_due = now
                else:
                    self._beat_due = now + self.heartbeat.period_s
            self._cond.notify_all()
            return self._next_delay(now)

    def _beat(self, busy):
        try:
            if busy:
                self.heartbeat.beat()
            else:
                self.heartbeat.retire()
            return True
        except Exception:
            logger.warning("Could not send this process's heartbeat; retrying in a period.", exc_info=True)
            return False

    def close(self) -> None:
        """Stop the thread (tests; a worker process just exits)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _next_delay(self, now: float) -> float | None:
        # Leases being renewed are skipped: tick() notifies when they are done.
        dues = [lease.due for lease in self._leases if not lease.renewing]
        if self._beat_due is not None and not self._beating:
            dues.append(self._beat_due)
        return max(0.0, min(dues) - now) if dues else None

    def _ensure_thread(self) -> None:
        # is_alive() is also False in a forked child, which gets its own thread.
        if self.autostart and (self._thread is None or not self._thread.is_alive()):
            self._closed = False
            self._thread = threading.Thread(target=self._run, name="cao-lease-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    delay = self._next_delay(self.clock())
                    if delay == 0.0:
                        break
                    self.idle = delay is None
                    self._cond.wait(delay)  # None: sleep until track() notifies
                    self.idle = False
                    self.wakeups += 1
                if self._closed:
                    return
            self.tick()
