"""A busy service's line, served fairly: round-robin across tenants by weight, aged priority within one.

Against a real Redis; the randomized model test (tests/test_limiter.py,
LimiterMatchesModel) checks the same rules on random sequences.
"""

import pytest
import redis
from django.conf import settings

from orchestration.limiter import Limiter
from scripts.polling import wait_until

SERVICE = "fair"
AGING_S = 10.0


@pytest.fixture
def client():
    client = redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def limiter(client):
    return Limiter(client, grant_ttl_s=60)


def acquire(limiter, member, *, tenant="", weight=1, priority=0, aging_s=AGING_S, limit=1):
    return limiter.acquire(
        SERVICE, member, limit=limit, ttl_s=60, payload=member, tenant=tenant, weight=weight, priority=priority,
        aging_s=aging_s,
    )


def park(limiter, member, **lane):
    acq = acquire(limiter, member, **lane)
    assert not acq.granted, f"{member} was expected to park"
    return acq


def served_order(limiter, first_holder, count):
    """Release the holder, then each member handed the slot in turn: who got it, in order."""
    order, holder = [], first_holder
    for _ in range(count):
        handoffs = limiter.release(SERVICE, holder, limit=1)
        if not handoffs:
            break
        (holder,) = handoffs
        assert limiter.acquire(SERVICE, holder, limit=1, ttl_s=60, payload=holder).granted
        order.append(holder)
    return order


def test_a_tenant_that_joins_a_backlog_is_served_in_turn_not_behind_it(limiter):
    # Given tenant 1's six jobs waiting for the only slot,
    acquire(limiter, "holder", tenant="1")
    for i in range(6):
        park(limiter, f"a{i}", tenant="1")
    # when tenant 2's two jobs arrive after them,
    park(limiter, "b0", tenant="2")
    park(limiter, "b1", tenant="2")

    # they take every other turn instead of waiting for all six.
    assert served_order(limiter, "holder", 8) == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


def test_weights_share_the_turns(limiter):
    # Tenant 1 weighs 2, tenant 2 weighs 1: two turns for one.
    acquire(limiter, "holder", tenant="1", weight=2)
    for i in range(8):
        park(limiter, f"a{i}", tenant="1", weight=2)
    for i in range(4):
        park(limiter, f"b{i}", tenant="2")

    order = served_order(limiter, "holder", 9)

    assert [member[0] for member in order] == list("abaabaaba")


def test_an_idle_tenant_banks_no_turns(limiter):
    # Tenant 2 was served once, then tenant 1 had the line to itself for nine turns.
    acquire(limiter, "holder", tenant="2")
    park(limiter, "b-early", tenant="2")
    for i in range(14):
        park(limiter, f"a{i}", tenant="1")
    assert served_order(limiter, "holder", 11) == ["a0", "b-early", *[f"a{i}" for i in range(1, 10)]]

    # Back with three jobs, tenant 2 takes turns with tenant 1 from now on,
    # not the nine turns it "missed" in a row.
    for i in range(3):
        park(limiter, f"b{i}", tenant="2")
    assert served_order(limiter, "a9", 6) == ["b0", "a10", "b1", "a11", "b2", "a12"]


def test_a_higher_priority_goes_first_within_its_tenant(limiter):
    acquire(limiter, "holder", tenant="1")
    park(limiter, "low", tenant="1", priority=0)
    park(limiter, "lower", tenant="1", priority=-3)
    park(limiter, "high", tenant="1", priority=5)

    assert served_order(limiter, "holder", 3) == ["high", "low", "lower"]


def test_priority_does_not_jump_another_tenants_turn(limiter):
    acquire(limiter, "holder", tenant="1")
    park(limiter, "a0", tenant="1")
    park(limiter, "a1", tenant="1")
    park(limiter, "b-urgent", tenant="2", priority=10)

    # Tenant 1 is first in line; tenant 2's priority only orders tenant 2's jobs.
    assert served_order(limiter, "holder", 3) == ["a0", "b-urgent", "a1"]


def server_ms(client):
    seconds, micros = client.time()
    return seconds * 1000 + micros // 1000


def test_a_wait_longer_than_the_priority_gap_goes_first(limiter, client):
    # aging 10 ms a point: a priority-1 job is one that arrived 10 ms earlier.
    acquire(limiter, "holder", tenant="1")
    park(limiter, "waited", tenant="1", priority=0, aging_s=0.01)
    parked_at = server_ms(client)
    wait_until(lambda: server_ms(client) - parked_at >= 50, timeout=5, interval=0.01, message="50 ms of Redis time")
    park(limiter, "newer-higher", tenant="1", priority=1, aging_s=0.01)

    # It waited 50 ms more, worth more than the one point of priority: it goes first.
    assert served_order(limiter, "holder", 2) == ["waited", "newer-higher"]


def test_a_priority_gap_larger_than_the_wait_goes_first(limiter, client):
    # The same wait against an aging of 10 s a point: the point of priority wins.
    acquire(limiter, "holder", tenant="1")
    park(limiter, "waited", tenant="1", priority=0)
    parked_at = server_ms(client)
    wait_until(lambda: server_ms(client) - parked_at >= 50, timeout=5, interval=0.01, message="50 ms of Redis time")
    park(limiter, "newer-higher", tenant="1", priority=1)

    assert served_order(limiter, "holder", 2) == ["newer-higher", "waited"]


def test_position_counts_the_turns_before_it(limiter):
    acquire(limiter, "holder", tenant="1")
    for i in range(5):
        park(limiter, f"a{i}", tenant="1")

    # Tenant 2 joins at the same virtual time as tenant 1's head, which goes
    # first on the tie: one job is served before it, not five.
    assert park(limiter, "b0", tenant="2").position == 1
    # Its second job comes after a0, b0 and a1.
    assert park(limiter, "b1", tenant="2").position == 3
    # And tenant 1's last is behind its own four and tenant 2's two.
    assert acquire(limiter, "a4", tenant="1").position == 6


def test_a_weight_change_applies_from_the_next_acquire(limiter):
    acquire(limiter, "holder", tenant="1")
    for i in range(6):
        park(limiter, f"a{i}", tenant="1")
    for i in range(8):
        park(limiter, f"b{i}", tenant="2")
    # An ops person gives tenant 2 a weight of 3: its next message says so.
    acquire(limiter, "b7", tenant="2", weight=3)

    order = served_order(limiter, "holder", 9)

    # Both were due at the same virtual time, tenant 1 first; from then on
    # each of tenant 2's turns costs it a third of tenant 1's.
    assert [member[0] for member in order] == list("abbbbabbb")


def test_a_lapsed_reservation_goes_back_to_its_place_in_its_lane(client):
    limiter = Limiter(client, grant_ttl_s=0.2)
    acquire(limiter, "holder", tenant="1")
    park(limiter, "a0", tenant="1")
    park(limiter, "a1", tenant="1")
    assert limiter.release(SERVICE, "holder", limit=1) == ("a0",)

    # The message handed to a0 is lost: its reservation lapses,
    wait_until(lambda: limiter.locate(SERVICE, "a0") == "waiter", timeout=5, interval=0.02, message="lapse")
    # and the next pump hands the slot to a0 again, not to a1.
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ("a0",)


def test_a_cool_down_returns_reservations_to_their_lanes(limiter):
    acquire(limiter, "holder", tenant="1")
    park(limiter, "a0", tenant="1")
    park(limiter, "b0", tenant="2")
    assert limiter.release(SERVICE, "holder", limit=1) == ("a0",)

    limiter.cool_down(SERVICE, seconds=600)
    assert limiter.locate(SERVICE, "a0") == "waiter"
    limiter.client.delete(limiter.keys(SERVICE)[8])  # the cool-down is over, without waiting for it

    # a0's reservation was dropped by the cool-down, and its tenant had had
    # its turn: b0 goes next, then a0, which has kept its place.
    assert limiter.redispatch_waiters(SERVICE, limit=1) == ("b0",)
    assert acquire(limiter, "b0", tenant="2").granted
    assert served_order(limiter, "b0", 1) == ["a0"]


def test_a_tenant_with_a_colon_is_refused(limiter):
    with pytest.raises(ValueError, match="tenant"):
        acquire(limiter, "m", tenant="1:2")
