"""The pump of a line held back by a spent requests-per-minute budget.

No worker and no release moves these lines: only this process's pump timer
does (``orchestration.slots``). The hand-offs it sends are recorded at the
edge where they would become step messages.
"""

import threading
import time
import uuid

import pytest
import redis

from common.redis import get_redis
from jobs.outcomes import StepDispatch
from orchestration import slots
from orchestration.limiter import Limiter
from services_registry.models import Service

SERVICE = "prompt_enhancer"
WINDOW_S = 0.3
OWNER = "this-test"


@pytest.fixture
def budget(registry, settings):
    """prompt_enhancer at one call per 0.3 s window, ten slots."""
    settings.CAO_RATE_WINDOW_S = WINDOW_S
    Service.objects.filter(name=SERVICE).update(requests_per_minute=1, concurrency_limit=10)
    return Service.objects.get(name=SERVICE)


@pytest.fixture
def sent(monkeypatch):
    """The hand-offs sent, as (job_id, step_index) pairs, in order."""
    messages, lock = [], threading.Lock()

    def record(step):
        with lock:
            messages.append((str(step.job_id), step.step_index))

    monkeypatch.setattr(slots, "send_step", record)
    return messages


def step():
    return StepDispatch(uuid.uuid4(), 0, 1, SERVICE)


def new_limiter(**options):
    """A limiter of its own keys: the pump timers of other tests' limiters, still running, cannot reach its line."""
    return Limiter(get_redis(), prefix=f"cao:lim:{uuid.uuid4().hex[:8]}", **options)


def sent_for(sent, dispatch):
    return sent.count((str(dispatch.job_id), dispatch.step_index))


def test_every_waiter_of_one_window_is_handed_its_slot_in_a_later_window_without_any_release(budget, sent, wait):
    limiter = new_limiter()
    first, *parked = steps = [step() for _ in range(4)]
    acquisitions = [slots.acquire_step(s, budget, limiter=limiter, owner=OWNER) for s in steps]
    assert acquisitions[0].granted and not any(a.granted for a in acquisitions[1:])

    # One window each: the last one is handed over by a timer its own park did not set.
    wait(lambda: all(sent_for(sent, s) == 1 for s in parked), timeout=10, message="every waiter handed a slot")
    assert sent_for(sent, first) == 0  # granted at once: nothing to send


class FlakyOccupancy:
    """A limiter whose first ``occupancy`` read fails as a lost connection to Redis would."""

    def __init__(self, limiter):
        self._limiter = limiter
        self.failures = 1

    def occupancy(self, service):
        if self.failures:
            self.failures -= 1
            raise redis.ConnectionError("Connection reset by peer")
        return self._limiter.occupancy(service)

    def __getattr__(self, name):
        return getattr(self._limiter, name)


def test_a_pump_that_cannot_reach_redis_tries_again(budget, sent, wait, monkeypatch):
    monkeypatch.setattr(slots, "PUMP_RETRY_S", 0.1)
    limiter = FlakyOccupancy(new_limiter())
    granted, waiter = step(), step()
    assert slots.acquire_step(granted, budget, limiter=limiter, owner=OWNER).granted
    assert not slots.acquire_step(waiter, budget, limiter=limiter, owner=OWNER).granted

    wait(lambda: sent_for(sent, waiter) == 1, timeout=10, message="the waiter handed its slot after the failed pump")
    assert limiter.failures == 0


def test_a_hand_off_whose_reservation_lapses_untaken_is_sent_again(budget, sent, wait):
    # Its message was lost: the reservation lapses, the waiter goes back to
    # its place, and the pump (not only maintenance) hands the slot over again.
    limiter = new_limiter(grant_ttl_s=WINDOW_S)
    granted, waiter = step(), step()
    assert slots.acquire_step(granted, budget, limiter=limiter, owner=OWNER).granted
    assert not slots.acquire_step(waiter, budget, limiter=limiter, owner=OWNER).granted

    wait(lambda: sent_for(sent, waiter) >= 2, timeout=10, message="the lapsed hand-off sent again")


def test_a_pump_due_for_another_limiter_does_not_stand_in_for_this_ones(budget, sent, wait):
    # Two limiters (two Redis prefixes, say) share one process: each has its own timer.
    other = new_limiter()
    slots._pump_line_at(slots.time.time() + WINDOW_S / 3, SERVICE, other)
    limiter = new_limiter()
    granted, waiter = step(), step()
    assert slots.acquire_step(granted, budget, limiter=limiter, owner=OWNER).granted
    assert not slots.acquire_step(waiter, budget, limiter=limiter, owner=OWNER).granted

    wait(lambda: sent_for(sent, waiter) == 1, timeout=10, message="the waiter handed its slot by its own limiter's pump")


class SteppedBackClock:
    """``time`` as the pump reads it, after the wall clock was stepped back (an NTP correction, a resumed VM)."""

    def __init__(self, by_s):
        self.by_s = by_s

    def time(self):
        return time.time() - self.by_s


def test_a_pump_that_wakes_early_by_the_wall_clock_still_schedules_the_next_one(budget, sent, wait, monkeypatch):
    # Its timer counts monotonic time, so after the step it wakes before its
    # own due time by the wall clock: that due time is its own, not another
    # timer's to rely on, and the rest of the line still gets a pump.
    limiter = new_limiter()
    granted, *waiters = steps = [step() for _ in range(3)]
    acquisitions = [slots.acquire_step(s, budget, limiter=limiter, owner=OWNER) for s in steps]
    assert acquisitions[0].granted and not any(a.granted for a in acquisitions[1:])
    monkeypatch.setattr(slots, "time", SteppedBackClock(by_s=WINDOW_S / 3))

    wait(lambda: all(sent_for(sent, s) == 1 for s in waiters), timeout=10, message="both waiters handed a slot")


def test_a_release_that_finds_the_budget_spent_leaves_the_rest_of_the_line_a_pump(budget, sent, wait):
    # Its waiters parked for a slot, not for the budget, so no park of theirs
    # set a timer: the release that cannot pass its slot on must.
    Service.objects.filter(name=SERVICE).update(concurrency_limit=1)
    budget.refresh_from_db()
    limiter = new_limiter()
    first, second, third = step(), step(), step()
    assert slots.acquire_step(first, budget, limiter=limiter, owner=OWNER).granted
    wait(lambda: limiter.occupancy(SERVICE).requests_in_window == 0, timeout=10, message="the budget's window to pass")
    for waiter in (second, third):
        parked = slots.acquire_step(waiter, budget, limiter=limiter, owner=OWNER)
        assert not parked.granted and parked.rate_limited_until is None  # held by the slot, not the budget

    slots.release_step(first, limit=1, limiter=limiter)  # hands its slot to second: the budget is spent again
    assert sent_for(sent, second) == 1 and sent_for(sent, third) == 0
    slots.release_step(second, limit=1, limiter=limiter)  # its slot is free, its budget is not

    wait(lambda: sent_for(sent, third) == 1, timeout=10, message="the last waiter handed a slot once the budget has room")


def test_a_pump_grants_again_when_its_window_made_room_while_it_granted(budget, sent, wait, monkeypatch):
    # The window moves on between the pump's grants and its read of the line:
    # there is room again, nobody parks, and no release is coming.
    limiter = new_limiter()
    granted, *waiters = steps = [step() for _ in range(3)]
    for s in steps:
        slots.acquire_step(s, budget, limiter=limiter, owner=OWNER)
    real_redispatch = limiter.redispatch_waiters
    grants = []

    def redispatch_then_window_moves_on(service, *, limit):
        handoffs = real_redispatch(service, limit=limit)
        grants.append(len(handoffs))
        if len(grants) == 1:
            limiter.client.delete(limiter.keys(SERVICE)[10])  # the window's starts: as if they all left it
        return handoffs

    monkeypatch.setattr(limiter, "redispatch_waiters", redispatch_then_window_moves_on)

    wait(lambda: all(sent_for(sent, s) == 1 for s in waiters), timeout=10, message="both waiters handed a slot")
    assert grants[:2] == [1, 1]  # the second in the same pump, not a window later
