"""The per-service limiter against a real Redis (db 15, flushed per test)."""

import logging
import multiprocessing
import os
import random
import signal
import threading
import time

import pytest
import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from orchestration.lease_keeper import LeaseKeeper
from orchestration.limiter import Acquisition, Limiter
from scripts.polling import wait_until
from tests.limiter_helpers import Model, dispatch, inbox_of, kept_holder, stress_worker, take_slot

SERVICE = "svc"
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def client():
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def limiter(client):
    return Limiter(client, grant_ttl_s=5)


def park(limiter, member, *, limit=1, ttl_s=10):
    acq = limiter.acquire(SERVICE, member, limit=limit, ttl_s=ttl_s, payload=f"msg:{member}")
    assert not acq.granted, f"{member} was expected to park"
    return acq


def hold(limiter, member, *, limit=1, ttl_s=10):
    acq = limiter.acquire(SERVICE, member, limit=limit, ttl_s=ttl_s, payload=f"msg:{member}")
    assert acq.granted, f"{member} was expected to get a slot"
    return acq


def check_invariants(occupancy, limit):
    holders = {h.member for h in occupancy.holders}
    granted = {g.member for g in occupancy.granted}
    waiters = {w.member for w in occupancy.waiters}
    assert occupancy.in_use <= limit, occupancy
    assert not holders & waiters, f"both holder and waiter: {holders & waiters}"
    assert granted <= waiters, f"granted but not waiting: {granted - waiters}"


# Basics ------------------------------------------------------------------


def test_keys_share_one_hash_tag(limiter):
    keys = limiter.keys("billing")
    assert all(key.startswith("cao:lim:{billing}:") for key in keys)
    assert len(set(keys)) == 18


def test_acquire_is_idempotent_for_a_holder(limiter):
    assert hold(limiter, "a") == Acquisition(granted=True, position=None, handoffs=())
    assert hold(limiter, "a").granted
    assert limiter.occupancy(SERVICE).in_use == 1


def test_works_without_decode_responses(client):
    raw = Limiter(redis.Redis.from_url(settings.REDIS_URL, decode_responses=False))
    hold(raw, "a")
    assert park(raw, "b").position == 0
    assert raw.locate(SERVICE, "b") == "waiter"
    assert [w.member for w in raw.occupancy(SERVICE).waiters] == ["b"]
    assert raw.release(SERVICE, "a", limit=1) == ("msg:b",)


def test_occupancy_reports_holders_grants_and_waiters(limiter):
    hold(limiter, "a", limit=2)
    hold(limiter, "b", limit=2)
    park(limiter, "c", limit=2)
    park(limiter, "d", limit=2)
    limiter.release(SERVICE, "a", limit=2)  # hands the slot to c

    occupancy = limiter.occupancy(SERVICE)

    assert [h.member for h in occupancy.holders] == ["b"]
    assert [g.member for g in occupancy.granted] == ["c"]
    assert [w.member for w in occupancy.waiters] == ["c", "d"]
    assert (occupancy.in_use, occupancy.waiting) == (2, 1)
    assert 0 <= occupancy.oldest_wait_s < 5


# Property 1: never more than `limit` holders --------------------------------


def run_stress(url, *, processes, rounds, limit, ttl_s, crash_every=None):
    lock = FORK.Lock()
    current = FORK.Value("i", 0, lock=False)
    peak = FORK.Value("i", 0, lock=False)
    workers = []
    for index in range(processes):
        crashes = crash_every is not None and index % crash_every == 0
        kwargs = dict(
            rounds=rounds,
            limit=limit,
            ttl_s=ttl_s,
            lock=lock,
            current=current,
            peak=peak,
            crash_round=rounds // 2 if crashes else None,
            seed=index,
        )
        workers.append(FORK.Process(target=stress_worker, args=(url, SERVICE, index), kwargs=kwargs))
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 45
    for worker in workers:
        worker.join(timeout=max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    return [w.exitcode for w in workers], peak.value


def test_limit_holds_across_processes(client):
    # Given 8 processes competing for 3 slots, 25 times each,
    exitcodes, peak = run_stress(settings.REDIS_URL, processes=8, rounds=25, limit=3, ttl_s=2)

    # then every one finished, parked ones woke up through hand-offs,
    assert exitcodes == [0] * 8
    # and no more than 3 ever held a slot at once (and the limit was reached).
    assert peak == 3
    occupancy = Limiter(client).occupancy(SERVICE)
    assert (occupancy.in_use, len(occupancy.waiters)) == (0, 0)


def test_limit_holds_when_holders_are_killed(client):
    # Given 8 processes on 3 slots where every other one is SIGKILLed mid-hold,
    ttl_s = 0.5
    exitcodes, peak = run_stress(settings.REDIS_URL, processes=8, rounds=12, limit=3, ttl_s=ttl_s, crash_every=2)

    # then the dead never released, yet the living all finished,
    assert exitcodes == [-signal.SIGKILL, 0] * 4
    assert peak <= 3
    # and the dead holders' leases are gone within the ttl.
    time.sleep(ttl_s)
    limiter = Limiter(client)
    assert limiter.occupancy(SERVICE).in_use == 0
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ()


# Property 2: parking never sleeps ------------------------------------------


def test_parked_acquires_return_at_once_without_threads(limiter):
    hold(limiter, "holder")
    threads = threading.active_count()
    started = time.perf_counter()

    positions = [park(limiter, f"w{i}").position for i in range(200)]

    assert time.perf_counter() - started < 5  # a blocking acquire would take forever
    assert positions == list(range(200))
    assert threading.active_count() == threads
    assert limiter.occupancy(SERVICE).waiting == 200


# Property 3: FIFO hand-off -------------------------------------------------


def test_release_hands_the_slot_to_waiters_in_arrival_order(limiter):
    hold(limiter, "h")
    for member in ["w0", "w1", "w2"]:
        park(limiter, member)

    previous = "h"
    for member in ["w0", "w1", "w2"]:
        # The release call itself returns the head waiter's message: no polling.
        assert limiter.release(SERVICE, previous, limit=1) == (f"msg:{member}",)
        assert limiter.locate(SERVICE, member) == "granted"
        hold(limiter, member)
        previous = member
    assert limiter.release(SERVICE, previous, limit=1) == ()


def test_newcomer_does_not_take_a_slot_reserved_for_a_waiter(limiter):
    hold(limiter, "h")
    park(limiter, "w")
    assert limiter.release(SERVICE, "h", limit=1) == ("msg:w",)

    # The slot is free but reserved: a newcomer queues, first of those without a slot.
    late = park(limiter, "late")
    assert (late.granted, late.position) == (False, 0)
    assert limiter.locate(SERVICE, "w") == "granted"
    hold(limiter, "w")


def test_early_duplicate_acquire_keeps_the_original_place(limiter):
    hold(limiter, "h")
    for member in ["w0", "w1", "w2"]:
        park(limiter, member)

    assert park(limiter, "w1").position == 1
    assert park(limiter, "w0").position == 0
    assert limiter.release(SERVICE, "h", limit=1) == ("msg:w0",)


def test_lapsed_grant_keeps_its_place_and_is_handed_off_again(client):
    limiter = Limiter(client, grant_ttl_s=0.3)
    hold(limiter, "h")
    park(limiter, "w0")
    park(limiter, "w1")
    assert limiter.release(SERVICE, "h", limit=1) == ("msg:w0",)

    # Given the message dispatched to w0 is lost, its reservation lapses,
    time.sleep(0.35)
    assert limiter.locate(SERVICE, "w0") == "waiter"
    # but w0 stays first in line and maintenance dispatches it again.
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ("msg:w0",)
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ()
    assert limiter.locate(SERVICE, "w0") == "granted"
    assert park(limiter, "w1").position == 0  # next, once w0 took its slot
    hold(limiter, "w0")


def test_late_message_of_a_lapsed_grant_still_takes_the_slot(client):
    limiter = Limiter(client, grant_ttl_s=0.3)
    hold(limiter, "h")
    park(limiter, "w0")
    park(limiter, "w1")
    limiter.release(SERVICE, "h", limit=1)
    time.sleep(0.35)

    # w0's message was only slow: it is still the head, so it gets the slot.
    assert hold(limiter, "w0").handoffs == ()
    assert limiter.locate(SERVICE, "w1") == "waiter"


def test_release_withdraws_a_parked_member(limiter):
    hold(limiter, "h")
    park(limiter, "w0")
    park(limiter, "w1")

    assert limiter.release(SERVICE, "w0", limit=1) == ()
    assert limiter.locate(SERVICE, "w0") is None
    assert limiter.release(SERVICE, "h", limit=1) == ("msg:w1",)
    assert limiter.release(SERVICE, "h", limit=1) == ()  # idempotent


def test_withdrawing_a_granted_member_passes_its_slot_on(limiter):
    hold(limiter, "h")
    park(limiter, "w0")
    park(limiter, "w1")
    limiter.release(SERVICE, "h", limit=1)

    assert limiter.release(SERVICE, "w0", limit=1) == ("msg:w1",)


# Property 4: crash safety ----------------------------------------------------


def test_expired_holder_is_cleaned_up_by_the_next_acquire(limiter):
    hold(limiter, "dead", ttl_s=0.3)
    park(limiter, "w0")
    time.sleep(0.35)

    # No reaper ran: the next acquire drops the dead lease and hands its slot
    # to the head of the queue, not to itself.
    acq = limiter.acquire(SERVICE, "newcomer", limit=1, ttl_s=10, payload="msg:newcomer")

    assert acq == Acquisition(granted=False, position=0, handoffs=("msg:w0",))
    assert limiter.locate(SERVICE, "dead") is None
    assert limiter.locate(SERVICE, "w0") == "granted"


def test_expired_holder_is_cleaned_up_by_redispatch_and_release(limiter):
    hold(limiter, "dead", limit=2, ttl_s=0.3)
    hold(limiter, "live", limit=2)
    park(limiter, "w0", limit=2)
    park(limiter, "w1", limit=2)
    time.sleep(0.35)

    assert limiter.release(SERVICE, "live", limit=2) == ("msg:w0", "msg:w1")


def test_reap_drops_expired_leases_and_grants(client):
    limiter = Limiter(client, grant_ttl_s=0.3)
    hold(limiter, "dead", limit=2, ttl_s=0.3)
    hold(limiter, "h", limit=2)
    park(limiter, "w", limit=2)
    limiter.release(SERVICE, "h", limit=2)  # w granted
    time.sleep(0.35)

    assert limiter.locate(SERVICE, "dead") is None  # expired counts as absent
    assert limiter.reap(SERVICE) == 2
    assert limiter.locate(SERVICE, "w") == "waiter"


def test_lease_keeper_keeps_a_live_holder_beyond_several_ttls(limiter):
    # A TTL of 1.5 s: renewals every 0.5 s may each run a second late on a
    # busy machine and the lease still holds; the test spans over 2.5 TTLs.
    keeper = LeaseKeeper(limiter)
    hold(limiter, "busy", ttl_s=1.5)
    park(limiter, "w")
    try:
        with keeper.keep(SERVICE, "busy", 1.5):
            for _ in range(4):
                time.sleep(1.0)  # time must pass here: the property is about TTLs going by
                assert limiter.redispatch_waiters(SERVICE, limit=1) == ()
                assert limiter.locate(SERVICE, "busy") == "holder"
        assert limiter.release(SERVICE, "busy", limit=1) == ("msg:w",)
    finally:
        keeper.close()


def test_killed_holder_process_loses_its_slot_within_ttl(client, limiter):
    # Given a holder in another process, kept alive by its LeaseKeeper,
    ttl_s = 1.0
    ready = FORK.Event()
    child = FORK.Process(target=kept_holder, args=(settings.REDIS_URL, SERVICE, "child", ttl_s, ready))
    child.start()
    try:
        assert ready.wait(10)
        park(limiter, "w")
        time.sleep(3 * ttl_s)
        assert limiter.redispatch_waiters(SERVICE, limit=1) == ()

        # when it is SIGKILLed,
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.join(5)

        # then maintenance hands its slot to the waiter within the ttl.
        while not (handoffs := limiter.redispatch_waiters(SERVICE, limit=1)):
            assert time.monotonic() - killed < ttl_s + 2.0, "slot not recovered within its TTL"
            time.sleep(0.02)
        assert handoffs == ("msg:w",)
    finally:
        if child.is_alive():
            child.kill()


class CountingLimiter(Limiter):
    """A real limiter that records renewals."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.renewals = []

    def renew(self, service, member, *, ttl_s, owner=""):
        self.renewals.append(member)
        return super().renew(service, member, ttl_s=ttl_s, owner=owner)


def test_lease_keeper_renews_each_lease_every_third_of_its_ttl(client):
    now = [1000.0]
    limiter = CountingLimiter(client)
    keeper = LeaseKeeper(limiter, clock=lambda: now[0], autostart=False)
    try:
        short = keeper.track(SERVICE, "short", 30)
        keeper.track(SERVICE, "long", 60)
        assert keeper.tick() == 10
        assert limiter.renewals == []

        now[0] += 10
        assert keeper.tick() == 10
        assert limiter.renewals == ["short"]

        now[0] += 10
        assert keeper.tick() == 10
        assert sorted(limiter.renewals) == ["long", "short", "short"]

        keeper.untrack(short)
        now[0] += 10
        assert keeper.tick() == 10
        assert sorted(limiter.renewals) == ["long", "short", "short"]
        assert limiter.locate(SERVICE, "short") == "holder"  # renew re-added it
    finally:
        keeper.close()


def test_lease_keeper_thread_idles_without_wakeups(limiter):
    keeper = LeaseKeeper(limiter)
    try:
        with keeper.keep(SERVICE, "a", 0.3):
            wait_until(lambda: keeper.wakeups >= 2, timeout=10, message="two renewals")
        wait_until(lambda: keeper.idle, timeout=10, message="the keeper to see the lease is gone")
        wakeups = keeper.wakeups
        time.sleep(0.5)  # an idle keeper stays asleep however long nothing happens
        assert keeper.wakeups == wakeups and keeper.idle
        assert keeper.tracked == 0
    finally:
        keeper.close()


def test_lease_keeper_logs_renewal_failures_and_never_raises(caplog):
    unreachable = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1, retry=Retry(NoBackoff(), 0))
    down = Limiter(unreachable)
    keeper = LeaseKeeper(down)
    try:
        with caplog.at_level(logging.WARNING, logger="orchestration.lease_keeper"):
            with keeper.keep(SERVICE, "a", 0.15):
                # Wait for two failed renewals (retried at the next tick), however slow the machine.
                deadline = time.monotonic() + 10
                while len(caplog.records) < 2 and time.monotonic() < deadline:
                    time.sleep(0.02)
        messages = [r.getMessage() for r in caplog.records]
        assert len(messages) >= 2
        assert all("Could not renew the lease of a on svc" in m for m in messages)
    finally:
        keeper.close()


# Property 5: atomic transitions keep the invariants --------------------------


MEMBERS = ["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"]
# Three tenants of unequal sizes, one of them the default "" (a job without a key).
TENANT_OF = {"m0": "7", "m1": "7", "m2": "7", "m3": "7", "m4": "12", "m5": "12", "m6": "", "m7": "7"}
# An aging no wait in a test outweighs: priorities then order each lane outright.
ABSOLUTE_AGING_S = 1e7
# Rate budgets; no window ends within a test, so every grant counts against them.
RPMS = st.sampled_from([0, 0, 4, 9])
TPMS = st.sampled_from([0, 2500, 6000])
ESTIMATES = st.sampled_from([1000, 300])
# Tenants' caps on the slots they hold at once (0: none).
CAPS = st.fixed_dictionaries({tenant: st.sampled_from([0, 0, 1, 2]) for tenant in ("7", "12", "")})
BREAKER_THRESHOLD = 2


class LimiterMatchesModel(RuleBasedStateMachine):
    """Random sequences of calls give exactly the answers of the Python model."""

    @initialize(aging=st.booleans(), rpm=RPMS, tpm=TPMS, estimate=ESTIMATES, caps=CAPS)
    def setup(self, aging, rpm, tpm, estimate, caps):
        self.budgets = {"rpm": rpm, "tpm": tpm, "estimate": estimate}
        self.caps = caps
        self.client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
        self.limiter = Limiter(self.client, grant_ttl_s=60)
        self.service = f"model-{random.getrandbits(64)}"
        self.model = Model(aging=aging)
        self.aging_s = ABSOLUTE_AGING_S if aging else 0.0
        self.sent = 0
        self.limit = 0

    def teardown(self):
        if hasattr(self, "limiter"):
            try:
                self.every_waiter_is_served_once_the_limits_lift()
            finally:
                self.client.delete(*self.limiter.keys(self.service))
                self.client.close()

    def every_waiter_is_served_once_the_limits_lift(self):
        """Liveness: with the cool-down over, the circuit closed, no budget nor cap, the line empties.

        A waiter lost between the structures (in waiters but in no lane, say)
        would never be handed a slot: this finds it, whatever the run did.
        """
        keys = self.limiter.keys(self.service)
        self.client.delete(keys[8], keys[9])  # cooldown, breaker
        self.client.hset(keys[11], mapping={"rpm": 0, "tpm": 0})  # config
        for tenant in set(TENANT_OF.values()):
            self.client.hset(keys[14], f"c:{tenant}", 0)  # fair: no caps
        for holder in self.model.holders:
            dispatch = self.limiter.release(self.service, holder, limit=len(MEMBERS))
            self.serve(dispatch)
        # Reservations whose messages went nowhere (the test dispatches none) are served as their messages would be.
        self.serve(list(self.model.granted))
        self.serve(self.limiter.redispatch_waiters(self.service, limit=len(MEMBERS)))
        assert self.limiter.occupancy(self.service).waiters == ()

    def serve(self, handoffs):
        # Each handed-off member takes its slot, then gives it back, passing the line on.
        pending = list(handoffs)
        while pending:
            member = pending.pop().split("#")[0]
            acq = self.limiter.acquire(self.service, member, limit=len(MEMBERS), ttl_s=60, payload="drain",
                                       tenant=TENANT_OF[member])
            assert acq.granted, (member, acq)
            pending.extend(acq.handoffs)
            pending.extend(self.limiter.release(self.service, member, limit=len(MEMBERS)))

    def new_grants_allowed(self, *, withdrawing=False):
        """How many slots may be newly granted now: none while cooling or blocked, one probe, else any.

        ``withdrawing``: the call may take the probe's own place away, which
        lets the next waiter probe instead.
        """
        if self.model.cooling:
            return 0
        if withdrawing and self.model.circuit_state is not None:
            return 1
        if self.model.circuit() == "blocked":
            return 0
        return 1 if self.model.circuit() == "probe" else len(MEMBERS)

    @rule(rpm=RPMS, tpm=TPMS, estimate=ESTIMATES)
    def edit_budgets(self, rpm, tpm, estimate):
        # An ops person edits them in the admin: the next acquire passes them.
        self.budgets = {"rpm": rpm, "tpm": tpm, "estimate": estimate}

    @rule(
        member=st.sampled_from(MEMBERS), limit=st.integers(0, 4), weight=st.sampled_from([1, 1, 2, 3]),
        priority=st.integers(-2, 2),
    )
    def acquire(self, member, limit, weight, priority):
        self.sent += 1
        self.limit = limit
        payload = f"{member}#{self.sent}"
        budgets = self.budgets
        rpm, tpm, estimate = budgets["rpm"], budgets["tpm"], budgets["estimate"]
        self.model.rpm, self.model.tpm, self.model.estimate = rpm, tpm, estimate  # the budgets apply at once
        allowed = min(self.new_grants_allowed(), max(0, self.model.rate_room()))
        already = member in self.model.holders or member in self.model.granted
        tenant = TENANT_OF[member]
        lane = {"tenant": tenant, "weight": weight, "priority": priority}
        cap = self.caps[tenant]
        acq = self.limiter.acquire(
            self.service, member, limit=limit, ttl_s=60, payload=payload, aging_s=self.aging_s,
            requests_per_minute=rpm, tokens_per_minute=tpm, token_estimate=estimate, tenant_cap=cap, **lane,
        )
        assert (acq.granted, acq.position, acq.handoffs) == self.model.acquire(
            member, limit, payload, **lane, **budgets, cap=cap
        )
        assert acq.rate_limit == (None if acq.granted else self.model.rate_holds())
        held_by_cap = not acq.granted and acq.rate_limit is None and self.model.circuit() == "closed" and (
            not self.model.cooling and self.model.capped(tenant)
        )
        assert acq.tenant_capped == held_by_cap
        # Checked on the limiter's answer itself, not only against the model:
        # never over a limit, never over a budget.
        assert len(acq.handoffs) + (acq.granted and not already) <= allowed

    @rule(member=st.sampled_from(MEMBERS), limit=st.integers(0, 4), used=st.sampled_from([None, 0, 250, 2000]))
    def release(self, member, limit, used):
        self.limit = limit
        allowed = self.new_grants_allowed(withdrawing=True)
        handoffs = self.limiter.release(self.service, member, limit=limit, tokens_used=used)
        assert handoffs == self.model.release(member, limit, tokens_used=used)
        assert len(handoffs) <= allowed

    @rule(limit=st.integers(0, 4))
    def redispatch(self, limit):
        self.limit = limit
        allowed = self.new_grants_allowed()
        handoffs = self.limiter.redispatch_waiters(self.service, limit=limit)
        assert handoffs == tuple(self.model.pump(limit)[0])
        assert len(handoffs) <= allowed

    @rule()
    def cool_down(self):
        self.limiter.cool_down(self.service, seconds=600)
        self.model.cool_down()

    @rule()
    def cool_down_over(self):
        # Time passing, without waiting for it: the key expires by itself.
        self.client.delete(self.limiter.keys(self.service)[8])
        self.model.cool_down_over()

    @rule(member=st.sampled_from(MEMBERS), ok=st.sampled_from([False, False, True]), limit=st.integers(0, 4))
    def outcome(self, member, ok, limit):
        self.limit = limit
        reported = self.limiter.report_outcome(
            self.service, member, ok=ok, threshold=BREAKER_THRESHOLD, open_s=600, limit=limit
        )
        assert reported == self.model.outcome(member, ok, BREAKER_THRESHOLD, limit)

    @rule()
    def probe_due(self):
        # An open circuit's wait over, without waiting for it.
        breaker = self.limiter.keys(self.service)[9]
        if self.client.hget(breaker, "state") == "open":
            self.client.hset(breaker, "retry_at", 0)
        self.model.probe_due()

    @invariant()
    def same_state(self):
        if not hasattr(self, "limiter"):
            return
        occupancy = self.limiter.occupancy(self.service)
        assert {h.member for h in occupancy.holders} == self.model.holders
        assert {g.member for g in occupancy.granted} == self.model.granted
        assert [w.member for w in occupancy.waiters] == self.model.waiters
        for member in MEMBERS:
            assert self.limiter.locate(self.service, member) == self.model.locate(member)
        assert not self.model.holders & set(self.model.waiters)
        assert self.model.granted <= set(self.model.waiters)
        assert (occupancy.cooling_until is not None) == self.model.cooling
        assert occupancy.circuit == (self.model.circuit_state or "closed")
        assert occupancy.requests_in_window == len(self.model.starts)
        for tenant, cap in self.caps.items():
            assert not cap or self.model.use(tenant) <= cap  # never over a tenant's cap
        assert occupancy.tokens_in_window == sum(self.model.starts.values())
        if self.model.cooling:
            assert occupancy.granted == ()  # nothing is handed out while it cools down


TestLimiterMatchesModel = LimiterMatchesModel.TestCase
TestLimiterMatchesModel.settings = hypothesis_settings(
    max_examples=200, stateful_step_count=50, deadline=None, database=None
)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_concurrent_schedule_keeps_invariants(client, seed):
    # Given 6 threads running jobs on 2 slots, with random holds, duplicate
    # acquires, withdrawals and maintenance runs in between,
    limit, ttl_s = 2, 2
    limiter = Limiter(client, grant_ttl_s=5)
    lock = threading.Lock()
    state = {"current": 0, "peak": 0, "done": 0, "withdrawn": 0}
    errors = []
    stop = threading.Event()

    def job_thread(index):
        rng = random.Random(seed * 100 + index)
        try:
            for k in range(15):
                member = f"t{index}-{k}"
                if rng.random() < 0.15:  # a job cancelled right after asking
                    acq = limiter.acquire(SERVICE, member, limit=limit, ttl_s=ttl_s, payload=inbox_of(member))
                    dispatch(client, acq.handoffs)
                    dispatch(client, limiter.release(SERVICE, member, limit=limit))
                    with lock:
                        state["withdrawn"] += 1
                    continue
                take_slot(limiter, client, SERVICE, member, limit=limit, ttl_s=ttl_s)
                with lock:
                    state["current"] += 1
                    state["peak"] = max(state["peak"], state["current"])
                if rng.random() < 0.3:  # a redelivered message
                    assert limiter.acquire(SERVICE, member, limit=limit, ttl_s=ttl_s, payload="dup").granted
                if rng.random() < 0.3:
                    dispatch(client, limiter.redispatch_waiters(SERVICE, limit=limit))
                time.sleep(rng.uniform(0, 0.003))
                with lock:
                    state["current"] -= 1
                    state["done"] += 1
                dispatch(client, limiter.release(SERVICE, member, limit=limit))
        except Exception as exc:  # surfaced by the main thread
            errors.append(exc)

    def monitor():
        while not stop.is_set():
            try:
                check_invariants(limiter.occupancy(SERVICE), limit)
            except AssertionError as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=job_thread, args=(i,)) for i in range(6)]
    watcher = threading.Thread(target=monitor)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stop.set()
    watcher.join(5)

    # then no snapshot broke an invariant, the real holders never exceeded
    # the limit, and every job that waited was granted in the end.
    assert errors == []
    assert state["peak"] <= limit
    assert state["done"] + state["withdrawn"] == 6 * 15
    final = limiter.occupancy(SERVICE)
    assert (final.in_use, len(final.waiters)) == (0, 0)


# Limit changes ---------------------------------------------------------------


def test_raising_the_limit_hands_extra_slots_to_waiters_at_the_next_call(limiter):
    hold(limiter, "h", limit=1)
    for member in ["w0", "w1", "w2"]:
        park(limiter, member, limit=1)

    # An admin raises the limit to 3: the next call hands out the two new slots.
    acq = limiter.acquire(SERVICE, "late", limit=3, ttl_s=10, payload="msg:late")

    assert acq == Acquisition(granted=False, position=1, handoffs=("msg:w0", "msg:w1"))  # behind w2
    assert limiter.release(SERVICE, "h", limit=3) == ("msg:w2",)


def test_raising_the_limit_through_redispatch(limiter):
    hold(limiter, "h", limit=1)
    park(limiter, "w0", limit=1)

    assert limiter.redispatch_waiters(SERVICE, limit=2) == ("msg:w0",)


def test_lowering_the_limit_grants_nothing_until_holders_drop_below(limiter):
    for member in ["h0", "h1", "h2"]:
        hold(limiter, member, limit=3)
    park(limiter, "w0", limit=3)

    assert limiter.release(SERVICE, "h0", limit=1) == ()
    assert limiter.release(SERVICE, "h1", limit=1) == ()
    assert park(limiter, "w1", limit=1).position == 1
    assert limiter.release(SERVICE, "h2", limit=1) == ("msg:w0",)


def test_a_reserved_slot_survives_a_lowered_limit(limiter):
    hold(limiter, "h0", limit=2)
    hold(limiter, "h1", limit=2)
    park(limiter, "w", limit=2)
    limiter.release(SERVICE, "h0", limit=2)  # w granted

    assert hold(limiter, "w", limit=1).handoffs == ()
    assert limiter.occupancy(SERVICE).in_use == 2


def test_limit_zero_parks_everyone(limiter):
    assert park(limiter, "a", limit=0).position == 0
    assert limiter.redispatch_waiters(SERVICE, limit=0) == ()
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ("msg:a",)


def test_invalid_arguments_are_rejected(limiter):
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        limiter.acquire(SERVICE, "a", limit=-1, ttl_s=1, payload="p")
    with pytest.raises(ValueError, match="ttl must be positive, got 0"):
        limiter.acquire(SERVICE, "a", limit=1, ttl_s=0, payload="p")


# Redis losing its state, server time ------------------------------------------


def test_renew_re_adds_a_holder_lost_by_flushdb(client, limiter):
    hold(limiter, "a")
    assert limiter.renew(SERVICE, "a", ttl_s=10) is True

    client.flushdb()

    # The call is still in flight, so it must count against the limit again.
    assert limiter.renew(SERVICE, "a", ttl_s=10) is False
    assert limiter.locate(SERVICE, "a") == "holder"
    assert park(limiter, "b").position == 0


def test_after_redis_lost_its_data_calls_in_flight_are_counted_before_any_grant(client, limiter):
    hold(limiter, "a")
    client.flushdb()  # a restart without persistence: "a" is still calling

    censuses = []

    def census():
        censuses.append(1)
        return ["a"]

    parked = limiter.acquire(SERVICE, "b", limit=1, ttl_s=10, payload="msg:b", census=census)
    later = limiter.acquire(SERVICE, "c", limit=1, ttl_s=10, payload="msg:c", census=census)

    assert not parked.granted and not later.granted
    assert censuses == [1]  # taken once, by the first caller to notice
    assert limiter.locate(SERVICE, "a") == "holder"
    assert limiter.release(SERVICE, "a", limit=1) == ("msg:b",)


def test_a_census_never_shortens_a_lease_renewed_since_the_loss(client, limiter):
    hold(limiter, "a", ttl_s=60)
    client.flushdb()
    limiter.renew(SERVICE, "a", ttl_s=60)
    renewed = client.zscore(limiter.keys(SERVICE)[0], "a")

    assert limiter.take_census(SERVICE, ["a", "z"], ttl_s=1) == 1
    assert client.zscore(limiter.keys(SERVICE)[0], "a") == renewed
    assert limiter.take_census(SERVICE, ["y"], ttl_s=1) == 0  # one census per loss


def test_without_a_census_source_a_fresh_limiter_starts_empty(limiter):
    assert hold(limiter, "a").granted
    assert limiter.occupancy(SERVICE).in_use == 1


def test_renew_of_an_expired_lease_reports_it_lost(limiter):
    hold(limiter, "a", ttl_s=0.2)
    time.sleep(0.25)
    assert limiter.renew(SERVICE, "a", ttl_s=10) is False
    assert limiter.renew(SERVICE, "a", ttl_s=10) is True


def test_expiries_follow_the_redis_server_clock(client, limiter):
    seconds, micros = client.time()
    server_before = seconds + micros / 1e6
    hold(limiter, "a", ttl_s=10)
    park(limiter, "b")
    seconds, micros = client.time()
    server_after = seconds + micros / 1e6

    occupancy = limiter.occupancy(SERVICE)
    lease = client.zscore(limiter.keys(SERVICE)[0], "a") / 1000

    assert server_before + 10 - 0.002 <= lease <= server_after + 10
    assert occupancy.holders[0].expires_at == lease
    assert server_before - 0.002 <= occupancy.waiters[0].since <= server_after
    assert server_after - 0.002 <= occupancy.now <= server_after + 1


def test_a_restart_from_a_snapshot_takes_a_new_census(private_redis):
    # Given a census and one call in flight, saved in a snapshot (redis-server SAVE)
    client = redis.Redis.from_url(private_redis.url(), decode_responses=True)
    limiter = Limiter(client)
    in_flight = []

    def census():
        return list(in_flight)

    assert limiter.acquire(SERVICE, "a", limit=2, ttl_s=600, payload="pa", census=census).granted
    in_flight.append("a")
    client.save()
    # ... then a second call starts, after the snapshot
    assert limiter.acquire(SERVICE, "b", limit=2, ttl_s=600, payload="pb", census=census).granted
    in_flight.append("b")

    # When Redis crashes and reloads the snapshot: the census key is back, "b" is not
    private_redis.restart()
    client = redis.Redis.from_url(private_redis.url(), decode_responses=True)
    limiter = Limiter(client)
    assert client.exists(limiter.keys(SERVICE)[5]) and not client.zscore(limiter.keys(SERVICE)[0], "b")

    # Then the next caller takes a census before granting: no third call at a limit of 2
    third = limiter.acquire(SERVICE, "c", limit=2, ttl_s=600, payload="pc", census=census)
    assert not third.granted
    assert {holder.member for holder in limiter.occupancy(SERVICE).holders} == {"a", "b"}


# Cool-down: the service answered 429/503 with Retry-After -------------------------------------


def test_a_cooling_service_grants_no_free_slot_until_the_cool_down_ends(limiter):
    until = limiter.cool_down(SERVICE, seconds=0.3)

    parked = park(limiter, "a", limit=2)

    assert parked.cooling_until == pytest.approx(until, abs=0.01)
    assert limiter.occupancy(SERVICE).cooling_until == pytest.approx(until, abs=0.01)
    assert limiter.redispatch_waiters(SERVICE, limit=2) == ()  # still cooling: nobody is handed a slot
    wait_until(lambda: limiter.cooling_left_s(SERVICE) == 0, timeout=10, message="the cool-down to end")
    assert limiter.occupancy(SERVICE).cooling_until is None
    assert limiter.redispatch_waiters(SERVICE, limit=2) == ("msg:a",)
    assert hold(limiter, "a", limit=2).cooling_until is None


def test_a_cool_down_lets_calls_in_flight_finish_and_keeps_the_line_in_order(limiter):
    hold(limiter, "a")
    park(limiter, "b")
    park(limiter, "c")
    assert limiter.release(SERVICE, "a", limit=1) == ("msg:b",)  # b holds a reservation

    limiter.cool_down(SERVICE, seconds=0.3)

    # The reservation went back to b, who keeps its place: its message, arriving now, parks
    occupancy = limiter.occupancy(SERVICE)
    assert occupancy.granted == () and [w.member for w in occupancy.waiters] == ["b", "c"]
    assert park(limiter, "b").position == 0
    assert limiter.release(SERVICE, "nobody", limit=1) == ()  # a release hands nothing over meanwhile
    wait_until(lambda: limiter.cooling_left_s(SERVICE) == 0, timeout=10, message="the cool-down to end")
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ("msg:b",)
    check_invariants(limiter.occupancy(SERVICE), 1)


def test_a_holder_renewing_during_a_cool_down_keeps_its_slot(limiter):
    hold(limiter, "a")
    limiter.cool_down(SERVICE, seconds=5)

    assert hold(limiter, "a").granted  # a redelivered message of a call in flight
    assert limiter.renew(SERVICE, "a", ttl_s=10)


def test_a_cool_down_is_extended_never_shortened(limiter):
    longer = limiter.cool_down(SERVICE, seconds=30)

    assert limiter.cool_down(SERVICE, seconds=0.1) == longer
    assert limiter.cooling_left_s(SERVICE) > 20


# Circuit breaker: consecutive failures open it, one probe call closes it ---------------------


def fail(limiter, member, *, threshold=3, open_s=0.3, limit=3):
    return limiter.report_outcome(SERVICE, member, ok=False, threshold=threshold, open_s=open_s, limit=limit)


def succeed(limiter, member, *, threshold=3, limit=3):
    return limiter.report_outcome(SERVICE, member, ok=True, threshold=threshold, open_s=0.3, limit=limit)


def test_the_threshold_th_consecutive_failure_opens_the_circuit_and_a_success_resets_the_count(limiter):
    assert fail(limiter, "a")[:2] == ("closed", False)
    assert succeed(limiter, "b")[0] == "closed"  # consecutive: the count starts again
    assert fail(limiter, "c")[:2] == ("closed", False)
    assert fail(limiter, "d")[:2] == ("closed", False)
    assert hold(limiter, "x", limit=3).granted  # still closed: grants as usual

    assert fail(limiter, "e")[:2] == ("open", True)

    occupancy = limiter.occupancy(SERVICE)
    assert occupancy.circuit == "open" and occupancy.probe_at > occupancy.now
    parked = park(limiter, "y", limit=3)  # free slots, but the circuit is open
    assert parked.circuit_open is True


def test_an_open_circuit_lets_one_probe_through_whose_success_hands_the_rest_their_slots(limiter):
    for member in "abc":
        fail(limiter, member)
    for member in ("w1", "w2", "w3"):
        park(limiter, member, limit=3)
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ()  # not yet: the circuit waits open_s

    wait_until(lambda: limiter.blocked_for_s(SERVICE) == 0, timeout=10, message="the probe to be due")
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ("msg:w1",)  # one probe, though 3 slots are free
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ()
    assert hold(limiter, "w1", limit=3).granted
    assert limiter.occupancy(SERVICE).circuit == "probing"

    state, opened, handoffs = succeed(limiter, "w1")

    assert (state, opened, handoffs) == ("closed", False, ("msg:w2", "msg:w3"))
    assert limiter.occupancy(SERVICE).circuit == "closed"
    check_invariants(limiter.occupancy(SERVICE), 3)


def test_a_failed_probe_opens_the_circuit_again(limiter):
    for member in "abc":
        fail(limiter, member)
    park(limiter, "w1", limit=3)
    park(limiter, "w2", limit=3)
    wait_until(lambda: limiter.blocked_for_s(SERVICE) == 0, timeout=10, message="the probe to be due")
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ("msg:w1",)
    hold(limiter, "w1", limit=3)

    assert fail(limiter, "w1")[:2] == ("open", True)
    limiter.release(SERVICE, "w1", limit=3)

    assert limiter.redispatch_waiters(SERVICE, limit=3) == ()  # open again: w2 waits for the next probe
    assert limiter.occupancy(SERVICE).circuit == "open"


def test_a_probe_whose_reservation_lapsed_is_replaced_by_the_next_waiter(client):
    limiter = Limiter(client, grant_ttl_s=0.2)
    for member in "abc":
        fail(limiter, member, open_s=0.1)
    park(limiter, "w1", limit=3)
    park(limiter, "w2", limit=3)
    wait_until(lambda: limiter.blocked_for_s(SERVICE) == 0, timeout=10, message="the probe to be due")
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ("msg:w1",)  # its message is lost

    # The lapsed reservation is granted again, to the head of the line: still one probe at a time
    wait_until(lambda: limiter.locate(SERVICE, "w1") == "waiter", timeout=10, message="the reservation to lapse")
    assert limiter.redispatch_waiters(SERVICE, limit=3) == ("msg:w1",)


def test_switching_the_breaker_off_closes_an_open_circuit_and_the_line_moves(limiter):
    for member in "abc":
        fail(limiter, member, open_s=60)
    park(limiter, "w1", limit=3)

    state, _, handoffs = limiter.report_outcome(SERVICE, "", ok=True, threshold=0, open_s=60, limit=3)

    assert (state, handoffs) == ("closed", ("msg:w1",))


# Requests per minute: a sliding window of grants ------------------------------------------------


def rated(limiter, member, *, rpm=2, window_s=0.5, limit=5):
    return limiter.acquire(
        SERVICE, member, limit=limit, ttl_s=10, payload=f"msg:{member}", requests_per_minute=rpm,
        rate_window_s=window_s,
    )


def test_a_spent_budget_parks_callers_with_free_slots_until_the_window_has_room(limiter):
    assert rated(limiter, "a").granted and rated(limiter, "b").granted

    parked = rated(limiter, "c")

    occupancy = limiter.occupancy(SERVICE)
    assert not parked.granted and parked.rate_limited_until is not None
    assert parked.rate_limited_until == pytest.approx(occupancy.rate_frees_at)
    assert (occupancy.requests_per_minute, occupancy.requests_in_window) == (2, 2)
    assert limiter.release(SERVICE, "a", limit=5) == ()  # a free slot, but no room in the budget
    wait_until(lambda: limiter.blocked_for_s(SERVICE) == 0, timeout=10, message="room in the window")
    assert limiter.redispatch_waiters(SERVICE, limit=5) == ("msg:c",)


def test_no_window_ever_holds_more_grants_than_the_budget(limiter, client):
    granted_at = []
    # Until the window has moved on more than once (however slow the machine), with a deadline.
    deadline = time.monotonic() + 30
    member = 0
    while len(granted_at) < 7:
        assert time.monotonic() < deadline, f"only {len(granted_at)} grants within 30 s"
        member += 1
        if rated(limiter, f"m{member}", rpm=3, window_s=0.4, limit=100).granted:
            granted_at.append(time.monotonic())
        handoffs = limiter.redispatch_waiters(SERVICE, limit=100)
        granted_at.extend(time.monotonic() for _ in handoffs)

    # Seen from here, grants are late by however long this process waited to run: 0.1 s of slack.
    for start in granted_at:
        assert sum(start <= other < start + 0.3 for other in granted_at) <= 3


def test_calls_made_before_a_budget_was_set_count_in_its_first_window(limiter):
    for member in "abc":
        assert rated(limiter, member, rpm=0, window_s=60).granted  # no budget: granted, and counted
    assert limiter.occupancy(SERVICE).requests_in_window == 3

    # A budget of 4 set now leaves room for one more call in this window
    assert rated(limiter, "d", rpm=4, window_s=60).granted
    assert not rated(limiter, "e", rpm=4, window_s=60).granted
