"""Fair, crash-safe per-service concurrency limiter: a semaphore in Redis.

Per service, under one hash tag (``cao:lim:{<service>}:``): ``holders`` (ZSET
member -> lease expiry), ``waiters`` (ZSET member -> arrival ticket),
``granted`` (ZSET member -> reservation expiry, the waiters a freed slot was
handed to), ``payloads`` (HASH member -> message to dispatch on hand-off),
``owners`` (HASH holder -> the process running its call), ``cooldown``
(until when nothing is granted: the service answered 429/503 with
Retry-After; ``cool_down``) and ``breaker`` (the circuit breaker:
consecutive failures, and while open until when, or which probe call runs;
``report_outcome``), ``starts`` and ``config`` (the grants of the last
window and the requests-per-minute budget they are counted against), and
``lanes``, ``tenants``, ``fair`` and ``lane_of`` (the line served fairly
across tenants; limiter_common.lua says how).

Invariants, kept by Lua scripts in ``lua/`` (one atomic call per operation):

- A grant never raises |holders| + |granted| above the limit. Only a lowered
  limit or :meth:`Limiter.renew` of a lost lease (a call that really is in
  flight) can leave more, and then nothing is granted until it drops below.
- ``granted`` is a subset of ``waiters``; no member both holds and waits.
- Waiters are served round-robin across tenants (an API key each), in
  proportion to their weights, by start-time fair queueing: a tenant that
  joins the line is served next to those already in it, never behind their
  backlog. Within a tenant, a waiter's order is its arrival moved earlier by
  ``priority * aging``: a higher priority goes first, but one that waited
  longer than the difference goes before it, so nobody starves.
- A granted waiter keeps its lane entry until it acquires, so a lapsed
  reservation goes back to its place and is simply granted again.
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
import re
from dataclasses import dataclass
from pathlib import Path

from common.redis import ScriptCall

logger = logging.getLogger(__name__)

LUA_DIR = Path(__file__).resolve().parent / "lua"
# What acquire says holds a member back, by the name events use.
_RATE_LIMITS = {"requests": "requests_per_minute", "tokens": "tokens_per_minute"}
# Lane entries are "<tenant>:<order>:<member>": a tenant holds no ":".
_TENANT = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class Acquisition:
    """The outcome of :meth:`Limiter.acquire`.

    ``granted``: the member holds a slot. ``position``: when parked, how
    many waiters would be served before it were nobody else to arrive, else
    None. ``handoffs``: payloads of
    other waiters granted by this call; the caller must dispatch them.
    """

    granted: bool
    position: int | None
    handoffs: tuple[str, ...] = ()
    # While the service cools down (it answered 429/503 with Retry-After):
    # until when, UNIX seconds by the server's clock. None: it does not.
    cooling_until: float | None = None
    # The circuit breaker (open, or waiting for its probe) holds the member back.
    circuit_open: bool = False
    # A rate budget holds the member back until then (UNIX seconds), or None;
    # which one: "requests_per_minute" or "tokens_per_minute".
    rate_limited_until: float | None = None
    rate_limit: str | None = None
    # Its tenant holds as many slots of the service as its cap allows.
    tenant_capped: bool = False


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
    waiters: tuple[Waiter, ...]  # in arrival order (the fair line serves them otherwise), granted ones included
    cooling_until: float | None = None  # UNIX seconds; None: not cooling down
    circuit: str = "closed"  # "open" (no call until probe_at), "probing" (one call let through)
    probe_at: float | None = None  # UNIX seconds, when an open circuit lets its probe through
    requests_per_minute: int = 0  # the budget the last acquire passed (0: none)
    requests_in_window: int = 0  # grants it counts in the current window
    rate_frees_at: float | None = None  # UNIX seconds, when the spent budget next has room
    tokens_per_minute: int = 0  # the tokens budget the last acquire passed (0: none)
    tokens_in_window: int = 0  # what the window's calls count for: estimates, or what they reported
    # (tenant, its waiters without a reservation), in the order the fair line serves them.
    waiting_by_tenant: tuple[tuple[str, int], ...] = ()

    @property
    def in_use(self) -> int:
        """Slots taken: leases plus reservations."""
        return len(self.holders) + len(self.granted)

    @property
    def waiting(self) -> int:
        """Waiters without a slot reserved for them."""
        return len(self.waiters) - len(self.granted)

    @property
    def blocked_for_s(self) -> float:
        """Seconds before it may grant again: its cool-down, its open circuit's wait, or its spent budget."""
        ends = [until for until in (self.cooling_until, self.probe_at, self.rate_frees_at) if until]
        return max([0.0, *(until - self.now for until in ends)])

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


def _seconds_or_none(ms) -> float | None:
    ms = int(ms)
    return ms / 1000 if ms else None


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
        "acquire", "census", "renew", "disown", "release", "redispatch", "reap", "reclaim", "locate", "occupancy",
        "cool_down", "outcome",
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
            for name in (
                "holders", "granted", "waiters", "payloads", "ticket", "census", "owners", "moved", "cooldown",
                "breaker", "starts", "config", "lanes", "tenants", "fair", "lane_of", "tokens",
                "slot_tenant",
            )
        ]

    def _call(self, name, service, *args):
        return self._scripts[name](keys=self.keys(service), args=args)

    def acquire(
        self, service: str, member: str, *, limit: int, ttl_s: float, payload: str, census=None, owner: str = "",
        requests_per_minute: int = 0, rate_window_s: float = 60.0, tenant: str = "", weight: int = 1,
        priority: int = 0, aging_s: float = 0.0, tokens_per_minute: int = 0, token_estimate: int = 0,
        tenant_cap: int = 0,
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

        ``requests_per_minute``: slots granted per ``rate_window_s`` (a
        minute), counted over a sliding window; 0: no such budget. Kept for
        the releases and redispatches that grant without being told.

        ``tenant`` (letters, digits, ``_`` and ``-``), ``weight`` (its share
        of turns, from 1), ``priority`` and ``aging_s``: where a parked
        member stands in line. Its order within the tenant's lane is its
        arrival moved ``priority * aging_s`` earlier, fixed when it parks.

        ``tokens_per_minute``: the tokens the calls of a window may use (0:
        no such budget); each call counts for ``token_estimate`` from its
        grant until :meth:`release` says what it used.

        ``tenant_cap``: the most slots of the service the tenant may hold at
        once (0: no cap); its waiters beyond it let the other tenants' pass.
        """
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"A tenant is letters, digits, '_' and '-', not {tenant!r}.")
        args = (
            member, _limit(limit), _ms(ttl_s), self.grant_ttl_ms, payload, owner,
            _limit(requests_per_minute), _ms(rate_window_s),
            tenant, max(1, int(weight)), int(priority), max(0, round(aging_s * 1_000_000)),
            _limit(tokens_per_minute), _limit(token_estimate), _limit(tenant_cap),
        )
        granted, position, handoffs, cooling_ms, circuit, rate_ms, rate_kind, capped = self._call(
            "acquire", service, *args
        )
        if int(granted) == -1:
            seeded = self.take_census(service, census() if census else (), ttl_s=ttl_s)
            if seeded:
                logger.warning(
                    "The limiter of %s had no state (Redis restarted or lost its data); "
                    "counted %s calls in flight before granting.", service, seeded,
                )
            granted, position, handoffs, cooling_ms, circuit, rate_ms, rate_kind, capped = self._call(
                "acquire", service, *args
            )
            if int(granted) == -1:  # lost again within a round trip: say so, retry the message
                raise RuntimeError(f"The limiter state of {service} keeps disappearing.")
        return Acquisition(
            granted=bool(granted),
            position=None if granted else int(position),
            handoffs=_texts(handoffs),
            cooling_until=_seconds_or_none(cooling_ms),
            circuit_open=bool(int(circuit)),
            rate_limited_until=_seconds_or_none(rate_ms),
            rate_limit=_RATE_LIMITS.get(_text(rate_kind)),
            tenant_capped=bool(int(capped)),
        )

    def report_outcome(
        self, service: str, member: str, *, ok: bool, threshold: int, open_s: float, limit: int
    ) -> tuple[str, bool, tuple[str, ...]]:
        """Tell the circuit breaker how ``member``'s call ended; (its state, whether this opened it, hand-offs).

        A success closes the circuit; a failure that counts (the caller
        decides which do) adds one to the consecutive failures, and the
        ``threshold``-th one, or a failed probe, opens it for ``open_s``.
        ``threshold`` 0: no breaker (any state left is cleared).
        """
        state, opened, handoffs = self._call(
            "outcome", service, member, int(bool(ok)), int(threshold), _ms(open_s), _limit(limit), self.grant_ttl_ms
        )
        return _text(state), bool(int(opened)), _texts(handoffs)

    def cool_down(self, service: str, *, seconds: float) -> float:
        """Grant no slot of ``service`` for ``seconds`` (extending a cool-down, never shortening one).

        Calls in flight go on; callers park and waiters keep their places
        (reservations not yet taken go back to their waiters). Returns the
        end, UNIX seconds by the server's clock. Nothing is granted at the
        end by itself: the next acquire, release or redispatch does it.
        """
        return int(self._call("cool_down", service, _ms(seconds))) / 1000

    def cooling_left_s(self, service: str) -> float:
        """Seconds until ``service``'s cool-down ends (0.0: it is not cooling down)."""
        return max(0, int(self.client.pttl(self.keys(service)[8]))) / 1000

    def blocked_for_s(self, service: str) -> float:
        """Seconds before ``service`` may grant again (``Occupancy.blocked_for_s``)."""
        return self.occupancy(service).blocked_for_s

    def take_census(self, service: str, members, *, ttl_s: float) -> int:
        """Seed ``holders`` with ``members`` unless a census exists; return how many were added."""
        return int(self._call("census", service, _ms(ttl_s), *members))

    def renew(self, service: str, member: str, *, ttl_s: float, owner: str = "") -> bool:
        """Extend a lease; False if it was lost (it is re-added all the same, with its owner)."""
        return bool(self._call("renew", service, member, _ms(ttl_s), owner))

    def disown(self, service: str, member: str, *, owner: str) -> bool:
        """Forget that ``owner`` runs ``member``'s call (a copy of its message took the slot); True if it was recorded."""
        return bool(self._call("disown", service, member, owner))

    def release(self, service: str, member: str, *, limit: int, tokens_used: int | None = None) -> tuple[str, ...]:
        """Give up a lease, reservation or place in the queue; return hand-offs.

        ``tokens_used``: what the call reported, counted in place of its
        estimate for the rest of its window (None: it did not say).
        """
        return self.handoffs_of(self.release_call(service, member, limit=limit, tokens_used=tokens_used).run())

    def release_call(self, service: str, member: str, *, limit: int, tokens_used: int | None = None) -> ScriptCall:
        """:meth:`release` as a call to send in another round trip; :meth:`handoffs_of` reads its result."""
        used = "" if tokens_used is None else _limit(tokens_used)
        return ScriptCall(
            self._scripts["release"], self.keys(service), (member, _limit(limit), self.grant_ttl_ms, used)
        )

    @staticmethod
    def handoffs_of(released) -> tuple[str, ...]:
        return _texts(released[1:])

    @staticmethod
    def line_blocked_until(released) -> float | None:
        """When (UNIX seconds, server clock) the spent rate budget next lets the rest of a release's line
        through; None when nobody without a reservation waits, or the budget had room for them."""
        return _seconds_or_none(released[0])

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
        (
            now_ms, holders, granted, waiters, cooling_ms, circuit, probe_ms, rpm, in_window, rate_ms, tpm, tokens,
            by_tenant,
        ) = self._call("occupancy", service)
        return Occupancy(
            now=int(now_ms) / 1000,
            holders=tuple(Holder(m, ms / 1000) for m, ms in _pairs(holders)),
            granted=tuple(Holder(m, ms / 1000) for m, ms in _pairs(granted)),
            waiters=tuple(Waiter(m, us / 1_000_000) for m, us in _pairs(waiters)),
            cooling_until=_seconds_or_none(cooling_ms),
            circuit=_text(circuit),
            probe_at=_seconds_or_none(probe_ms),
            requests_per_minute=int(rpm),
            requests_in_window=int(in_window),
            rate_frees_at=_seconds_or_none(rate_ms),
            tokens_per_minute=int(tpm),
            tokens_in_window=int(tokens),
            waiting_by_tenant=tuple((_text(tenant), int(count)) for tenant, count in _pairs(by_tenant)),
        )
