"""Helpers for tests/test_limiter.py: child-process bodies and a reference model."""

import os
import random
import signal
import time

import redis

from orchestration.lease_keeper import LeaseKeeper
from orchestration.limiter import Limiter


def dispatch(client, handoffs):
    """Deliver hand-offs: each payload names the Redis list its waiter BLPOPs."""
    for inbox in handoffs:
        client.lpush(inbox, "go")


def inbox_of(member):
    return f"test:inbox:{member}"


def take_slot(limiter, client, service, member, *, limit, ttl_s):
    """Acquire like a worker would: park, wait for the dispatched payload, retry.

    A BLPOP timeout stands in for the periodic maintenance task, which calls
    redispatch_waiters so that slots of dead holders reach the queue.
    """
    acq = limiter.acquire(service, member, limit=limit, ttl_s=ttl_s, payload=inbox_of(member))
    dispatch(client, acq.handoffs)
    while not acq.granted:
        if client.blpop([inbox_of(member)], timeout=ttl_s) is None:
            dispatch(client, limiter.redispatch_waiters(service, limit=limit))
            continue
        acq = limiter.acquire(service, member, limit=limit, ttl_s=ttl_s, payload=inbox_of(member))
        dispatch(client, acq.handoffs)


def stress_worker(url, service, index, *, rounds, limit, ttl_s, lock, current, peak, crash_round, seed):
    """Acquire/hold/release ``rounds`` times, counting real holders in ``current``.

    With ``crash_round`` set, the process SIGKILLs itself while holding in that
    round: its call ends (the counter drops) but its lease is never released.
    """
    client = redis.Redis.from_url(url, decode_responses=True)
    limiter = Limiter(client, grant_ttl_s=5)
    rng = random.Random(seed)
    for k in range(rounds):
        member = f"p{index}-{k}"
        take_slot(limiter, client, service, member, limit=limit, ttl_s=ttl_s)
        with lock:
            current.value += 1
            peak.value = max(peak.value, current.value)
        if k == crash_round:
            with lock:
                current.value -= 1
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(rng.uniform(0, 0.004))
        with lock:
            current.value -= 1
        dispatch(client, limiter.release(service, member, limit=limit))
    client.close()


def kept_holder(url, service, member, ttl_s, ready):
    """Take a slot, keep its lease alive with a LeaseKeeper and hang until killed."""
    client = redis.Redis.from_url(url, decode_responses=True)
    limiter = Limiter(client)
    assert limiter.acquire(service, member, limit=1, ttl_s=ttl_s, payload="unused").granted
    keeper = LeaseKeeper(limiter)
    with keeper.keep(service, member, ttl_s):
        ready.set()
        while True:
            time.sleep(1)


VIRTUAL_STEP = 1_000_000


class Model:
    """The limiter's semantics in plain Python, without expiry.

    Time is explicit: a cool-down lasts until ``cool_down_over()``, an open
    circuit waits for its probe until ``probe_due()``. Priorities are either
    ignored (``aging`` False: the limiter's aging is 0, arrival alone
    orders a lane) or absolute (``aging`` True: an aging so long that no
    wait in a test outweighs one priority step).
    """

    def __init__(self, *, aging=False):
        self.aging = aging
        self.holders = set()
        self.granted = set()
        self.waiters = []  # arrival order
        self.payloads = {}
        self.arrivals = 0
        self.lane_of = {}  # waiter -> (tenant, its order within the tenant's lane)
        self.virtual = {}  # tenant in line -> its virtual time
        self.saved = {}  # tenant out of line -> its virtual time
        self.weights = {}
        self.caps = {}
        self.slot_tenant = {}  # member holding a slot granted in line or at once -> its tenant
        self.clock = 0
        # The rate budgets: no window ends within a test, so every grant counts.
        self.rpm = self.tpm = self.estimate = 0
        self.starts = {}  # member counted in the window -> the tokens it counts for
        self.cooling = False
        self.circuit_state = None  # None (closed), "open" or "probing"
        self.circuit_due = False  # an open circuit's probe may go
        self.probe = None
        self.failures = 0

    def occupied(self):
        return len(self.holders) + len(self.granted)

    def circuit(self):
        """What the breaker says of grants: "closed", "blocked" or "probe"."""
        if self.circuit_state is None:
            return "closed"
        if self.circuit_state == "open":
            return "probe" if self.circuit_due else "blocked"
        return "blocked" if self.probe in self.holders or self.probe in self.granted else "probe"

    def pump(self, limit, me=None):
        handoffs, me_granted = [], False
        free = limit - self.occupied()
        say = self.circuit()
        if free <= 0 or self.cooling or say == "blocked":
            return handoffs, me_granted
        if say == "probe":
            free = 1
        free = min(free, self.rate_room())
        while free > 0:
            member, tenant = self.next_in_line()
            if member is None:
                break
            self.granted.add(member)
            self.slot_tenant[member] = tenant
            self.count_start(member)
            free -= 1
            if say == "probe":
                self.circuit_state, self.probe = "probing", member
            if member == me:
                me_granted = True
            else:
                handoffs.append(self.payloads[member])
        return handoffs, me_granted

    # --- the rate budgets -----------------------------------------------------------

    def rate_room(self):
        """How many more grants the budgets allow now."""
        room = 10**9
        if self.rpm > 0:
            room = self.rpm - len(self.starts)
        if self.tpm > 0:
            token_room = (self.tpm - sum(self.starts.values())) // max(1, self.estimate)
            if token_room < 1 and not self.starts:
                token_room = 1  # a call alone in its window may exceed the budget
            room = min(room, token_room)
        return room

    def rate_holds(self):
        """Which budget holds a parked member back: "requests_per_minute", "tokens_per_minute" or None."""
        if self.cooling or self.circuit() != "closed" or self.rate_room() > 0:
            return None
        requests_room = self.rpm - len(self.starts) if self.rpm > 0 else 10**9
        return "requests_per_minute" if requests_room <= self.rate_room() else "tokens_per_minute"

    def count_start(self, member):
        self.starts.setdefault(member, self.estimate)

    # --- the fair line ------------------------------------------------------------

    def lane(self, tenant):
        """The tenant's waiters without a reservation, in the order they are served."""
        return sorted(
            (m for m in self.waiters if m not in self.granted and self.lane_of[m][0] == tenant),
            key=lambda m: (self.lane_of[m][1], m),
        )

    def step(self, tenant):
        return max(1, VIRTUAL_STEP // max(self.weights.get(tenant, 1), 1))

    def enter_line(self, tenant):
        if tenant not in self.virtual:
            self.virtual[tenant] = max(self.saved.pop(tenant, 0), self.clock)

    def leave_line_if_empty(self, tenant):
        if tenant in self.virtual and not self.lane(tenant):
            self.saved[tenant] = self.virtual.pop(tenant)

    def use(self, tenant):
        """Slots (leases and reservations) the tenant holds."""
        return sum(1 for m in self.holders | self.granted if self.slot_tenant.get(m) == tenant)

    def capped(self, tenant):
        cap = self.caps.get(tenant, 0)
        return cap > 0 and self.use(tenant) >= cap

    def next_in_line(self):
        """The next waiter, and its tenant; tenants at their caps are passed over."""
        for virtual, tenant in sorted((v, t) for t, v in self.virtual.items()):
            if self.capped(tenant):
                continue
            lane = self.lane(tenant)
            self.clock = virtual
            self.virtual[tenant] = virtual + self.step(tenant)
            if len(lane) == 1:  # its lane empties: it leaves the line, keeping its virtual time
                self.saved[tenant] = self.virtual.pop(tenant)
            return lane[0], tenant
        return None, None

    def position(self, member):
        if member in self.granted:
            return 0
        tenant = self.lane_of[member][0]
        lane = self.lane(tenant)
        ahead = lane.index(member)
        turn = self.virtual[tenant] + ahead * self.step(tenant)
        for other, virtual in self.virtual.items():
            if other == tenant or virtual > turn:
                continue
            step = self.step(other)
            turns = (turn - virtual) // step + 1
            if virtual + (turns - 1) * step == turn and other > tenant:
                turns -= 1
            ahead += min(turns, len(self.lane(other)))
        return ahead

    def unreserve(self, member):
        self.granted.discard(member)
        self.slot_tenant.pop(member, None)
        self.enter_line(self.lane_of[member][0])

    def cool_down(self):
        self.cooling = True
        for member in list(self.granted):  # the reservations go back to their waiters
            self.unreserve(member)

    def cool_down_over(self):
        self.cooling = False

    def probe_due(self):
        if self.circuit_state == "open":
            self.circuit_due = True

    def outcome(self, member, ok, threshold, limit):
        """As limiter_outcome.lua: (state, opened, hand-offs)."""
        if ok or threshold <= 0:
            had_state = self.circuit_state is not None
            self.circuit_state, self.circuit_due, self.probe, self.failures = None, False, None, 0
            return "closed", False, tuple(self.pump(limit)[0]) if had_state else ()
        self.failures += 1
        probe_failed = self.circuit_state == "probing" and self.probe == member
        if probe_failed or (self.circuit_state is None and self.failures >= threshold):
            self.circuit_state, self.circuit_due, self.probe = "open", False, None
            return "open", True, ()
        return self.circuit_state or "closed", False, ()

    def forget_waiter(self, member):
        self.granted.discard(member)
        if member in self.waiters:
            self.waiters.remove(member)
            self.leave_line_if_empty(self.lane_of.pop(member)[0])
        self.payloads.pop(member, None)

    def hold(self, member):
        self.forget_waiter(member)
        self.holders.add(member)

    def acquire(
        self, member, limit, payload, *, tenant="", weight=1, priority=0, rpm=0, tpm=0, estimate=0, cap=0
    ):
        self.rpm, self.tpm, self.estimate = rpm, tpm, estimate
        self.weights[tenant], self.caps[tenant] = weight, cap
        if member in self.holders or member in self.granted:
            self.hold(member)
            return True, None, tuple(self.pump(limit)[0])
        if (
            not self.cooling and self.circuit_state is None
            and len(self.waiters) == len(self.granted) and self.occupied() < limit and self.rate_room() > 0
            and not self.capped(tenant)
        ):
            self.hold(member)
            self.slot_tenant[member] = tenant
            self.count_start(member)
            return True, None, ()
        if member not in self.waiters:
            self.waiters.append(member)
            self.arrivals += 1
            self.lane_of[member] = (tenant, (-priority if self.aging else 0, self.arrivals))
            self.enter_line(tenant)
        self.payloads[member] = payload
        handoffs, me_granted = self.pump(limit, member)
        if me_granted:
            self.hold(member)
            return True, None, tuple(handoffs)
        return False, self.position(member), tuple(handoffs)

    def release(self, member, limit, tokens_used=None):
        if tokens_used is not None and member in self.starts:
            self.starts[member] = tokens_used
        self.holders.discard(member)
        self.slot_tenant.pop(member, None)
        self.forget_waiter(member)
        return tuple(self.pump(limit)[0])

    def locate(self, member):
        if member in self.holders:
            return "holder"
        if member in self.granted:
            return "granted"
        if member in self.waiters:
            return "waiter"
        return None
