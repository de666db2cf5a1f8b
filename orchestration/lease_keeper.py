"""Keeps the leases of in-flight calls alive: one daemon thread per process.

A slot is held by a lease that expires unless renewed (``orchestration.limiter``);
the keeper renews every tracked lease every ttl / 3 and, with a heartbeat,
says the process is alive while it holds any. A process that dies stops
renewing, and its slots return by themselves.
"""

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from orchestration.limiter import Limiter

logger = logging.getLogger(__name__)


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

    def tracks(self, service: str, member: str) -> bool:
        """Whether this process keeps ``member``'s lease alive (its call runs here)."""
        with self._cond:
            return any(lease.service == service and lease.member == member for lease in self._leases)

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
