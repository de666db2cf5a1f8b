"""Idle worker threads wait for a message without waking every second, and leave at once on stop."""

import json
import queue
import subprocess
import sys
import threading

import dramatiq
import pytest

from orchestration.middleware import IdleWorkQueue, QuietIdleThreads
from scripts.stack import ROOT


def taker(work_queue, timeout):
    """A thread that takes one item as Dramatiq's worker threads do; its ``got`` is the item or Empty."""
    result = {}

    def take():
        try:
            result["got"] = work_queue.get(timeout=timeout)
        except queue.Empty as empty:
            result["got"] = empty

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    thread.result = result
    return thread


def stock_timeouts(count, timeout):
    """Wait until a taker on a stock queue has timed out ``count`` times (the clock the tests compare with)."""
    stock = queue.PriorityQueue()
    for _ in range(count):
        with pytest.raises(queue.Empty):
            stock.get(timeout=timeout)


def test_a_taker_waits_past_its_own_timeout_until_an_item_arrives():
    work_queue = IdleWorkQueue(idle_wait_s=60)
    thread = taker(work_queue, timeout=0.01)

    stock_timeouts(50, timeout=0.01)
    assert thread.is_alive()  # a stock PriorityQueue raised Empty after the first

    work_queue.put((0, "message"))
    thread.join(10)
    assert thread.result["got"] == (0, "message")


def test_a_taker_gives_up_after_the_idle_wait():
    work_queue = IdleWorkQueue(idle_wait_s=0.05)
    thread = taker(work_queue, timeout=0.01)

    thread.join(10)
    assert isinstance(thread.result["got"], queue.Empty)


def test_waking_the_idle_takers_returns_each_of_them_at_once_and_none_waits_long_again():
    work_queue = IdleWorkQueue(idle_wait_s=60)
    threads = [taker(work_queue, timeout=1) for _ in range(20)]

    work_queue.wake_idle(20)

    for thread in threads:
        thread.join(10)
        assert isinstance(thread.result["got"], queue.Empty)
    late = taker(work_queue, timeout=0.05)  # waits its own timeout only
    late.join(10)
    assert isinstance(late.result["got"], queue.Empty)
    assert work_queue.unfinished_tasks == 0  # what woke them is not left for Worker.join to wait on


def test_items_already_queued_are_still_taken_and_non_blocking_gets_are_unchanged():
    work_queue = IdleWorkQueue(idle_wait_s=60)
    work_queue.put((1, "b"))
    work_queue.put((0, "a"))
    work_queue.wake_idle(3)  # more than there are takers: the rest is skipped, never handed out

    with pytest.raises(queue.Empty):
        work_queue.get(timeout=1)  # a woken taker, even with items left (a stopping worker requeues them)
    assert work_queue.get_nowait() == (0, "a")  # in priority order
    assert work_queue.get_nowait() == (1, "b")
    with pytest.raises(queue.Empty):
        work_queue.get_nowait()


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_uses_it_processes_messages_and_stops_without_waiting_out_the_idle_wait(redis_db):
    broker = dramatiq.get_broker()
    assert any(isinstance(m, QuietIdleThreads) for m in broker.middleware)  # as configured in settings
    done = threading.Event()

    @dramatiq.actor(queue_name="idle-threads-test", broker=broker)
    def touch():
        done.set()

    worker = dramatiq.Worker(broker, queues={"idle-threads-test"}, worker_threads=50, worker_timeout=1000)
    worker.start()
    try:
        assert isinstance(worker.work_queue, IdleWorkQueue)
        touch.send()
        assert done.wait(10)
    finally:
        worker.stop(timeout=10_000)  # at most 10 s, against an idle wait of 60 s
        broker.middleware = [m for m in broker.middleware if getattr(m, "worker", None) is not worker]
    assert not any(thread.is_alive() for thread in worker.workers)


GREEN_WORKER = r"""
from gevent import monkey; monkey.patch_all()
import json, queue, threading
import dramatiq
from dramatiq.brokers.stub import StubBroker
from orchestration.middleware import IdleWorkQueue, QuietIdleThreads

broker = StubBroker(middleware=[QuietIdleThreads()])
done = threading.Event()

@dramatiq.actor(broker=broker, queue_name="q")
def touch():
    done.set()

worker = dramatiq.Worker(broker, worker_threads=100, worker_timeout=50)
worker.start()
gets = [0]
take = worker.work_queue.get
def counted(*args, **kwargs):
    gets[0] += 1
    return take(*args, **kwargs)
worker.work_queue.get = counted
touch.send()
assert done.wait(10)
before = gets[0]
stock = queue.PriorityQueue()  # gevent's: while a taker on it times out 10 times...
for _ in range(10):
    try:
        stock.get(timeout=0.05)
    except queue.Empty:
        pass
idle_gets = gets[0] - before  # ...Dramatiq's own queue would have woken its 100 greenlets 1,000 times
worker.stop(timeout=10_000)
print(json.dumps({
    "queue": type(worker.work_queue).__mro__[1].__module__,
    "idle_gets": idle_gets,
    "alive": sum(thread.is_alive() for thread in worker.workers),
}))
"""


def test_in_a_green_worker_idle_greenlets_do_not_wake_and_a_stop_wakes_them_at_once():
    done = subprocess.run(
        [sys.executable, "-c", GREEN_WORKER], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])

    assert result["queue"].startswith("gevent")  # gevent's queue, as monkey-patched
    assert result["idle_gets"] <= 1  # the greenlet that ran the message waits again; the others never woke
    assert result["alive"] == 0  # every greenlet left within the stop's 10 s, against an idle wait of 60 s
