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


class Model:
    """The limiter's semantics in plain Python, without expiry."""

    def __init__(self):
        self.holders = set()
        self.granted = set()
        self.waiters = []  # queue order
        self.payloads = {}

    def occupied(self):
        return len(self.holders) + len(self.granted)

    def pump(self, limit, me=None):
        handoffs, me_granted = [], False
        free = limit - self.occupied()
        for member in self.waiters:
            if free <= 0:
                break
            if member not in self.granted:
                self.granted.add(member)
                free -= 1
                if member == me:
                    me_granted = True
                else:
                    handoffs.append(self.payloads[member])
        return handoffs, me_granted

    def forget_waiter(self, member):
        self.granted.discard(member)
        if member in self.waiters:
            self.waiters.remove(member)
        self.payloads.pop(member, None)

    def hold(self, member):
        self.forget_waiter(member)
        self.holders.add(member)

    def acquire(self, member, limit, payload):
        if member in self.holders or member in self.granted:
            self.hold(member)
            return True, None, tuple(self.pump(limit)[0])
        if len(self.waiters) == len(self.granted) and self.occupied() < limit:
            self.hold(member)
            return True, None, ()
        if member not in self.waiters:
            self.waiters.append(member)
        self.payloads[member] = payload
        handoffs, me_granted = self.pump(limit, member)
        if me_granted:
            self.hold(member)
            return True, None, tuple(handoffs)
        return False, self.waiters.index(member), tuple(handoffs)

    def release(self, member, limit):
        self.holders.discard(member)
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
