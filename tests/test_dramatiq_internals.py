"""The private parts of Dramatiq the gateway relies on, pinned to one release.

``orchestration.broker`` does the work of ``RedisBroker.enqueue`` in one
round trip, subclasses Dramatiq's private ``_RedisConsumer`` and
reads the consumer thread's ``delay_queue``; ``middleware.QuietIdleThreads``
swaps the worker's ``work_queue`` before boot and stops its ``workers``
(tests/test_idle_threads.py runs a real one); maintenance calls a ``do_*``
command only for the dead-worker sweep it runs. An upgrade must re-check
them: these tests fail first.
"""

import re
import time
from pathlib import Path
from queue import PriorityQueue

import dramatiq
import pytest
from dramatiq.brokers.redis import RedisBroker, _RedisConsumer
from dramatiq.worker import ConsumerThread

from orchestration.broker import DRAMATIQ_VERSION, NotifyingRedisBroker

pytestmark = pytest.mark.django_db


def test_the_installed_dramatiq_is_the_release_the_broker_was_checked_against():
    assert dramatiq.__version__ == DRAMATIQ_VERSION


def test_the_requirements_pin_that_release():
    requirements = (Path(__file__).resolve().parent.parent / "requirements.txt").read_text()

    assert re.findall(r"^dramatiq(?:\[[^\]]*\])?==(\S+)", requirements, re.MULTILINE) == [DRAMATIQ_VERSION]


def test_the_redis_consumer_keeps_the_fields_the_wakeable_consumer_reads():
    broker = dramatiq.get_broker()
    assert isinstance(broker, NotifyingRedisBroker)
    consumer = broker.consume("default", prefetch=3, timeout=1000)

    assert isinstance(consumer, _RedisConsumer)
    assert (consumer.message_cache, consumer.queued_message_ids, consumer.misses) == ([], set(), 0)
    assert (consumer.prefetch, consumer.timeout, consumer.outstanding_message_count) == (3, 1000, 0)
    assert callable(broker.do_fetch)


def test_a_consumer_thread_holds_its_delayed_messages_in_a_heap_ordered_by_eta():
    thread = ConsumerThread(
        broker=dramatiq.get_broker(), queue_name="default.DQ", prefetch=1, work_queue=PriorityQueue(), worker_timeout=1000
    )

    assert isinstance(thread.delay_queue, PriorityQueue) and thread.delay_queue.queue == []


def test_any_command_of_the_redis_broker_runs_through_its_dispatch_script():
    broker = dramatiq.get_broker()

    assert isinstance(broker, RedisBroker)
    assert broker.do_qsize("default") >= 0


def test_the_one_round_trip_enqueue_stores_what_dramatiqs_own_enqueue_stores():
    broker = dramatiq.get_broker()
    sent = [
        dramatiq.Message(queue_name="default", actor_name="noop", args=(n,), kwargs={}, options={}) for n in range(2)
    ]

    ours = broker.enqueue(sent[0])  # one pipeline: the dispatch script by its SHA, then the wake-up
    stock = RedisBroker.enqueue(broker, sent[1])  # Dramatiq's own: the dispatch script through _dispatch

    consumer = broker.consume("default", prefetch=2, timeout=100)
    fetched = [next(consumer) for _ in range(2)]
    assert [m.options["redis_message_id"] for m in fetched] == [ours.options["redis_message_id"], stock.options["redis_message_id"]]
    assert [m.args for m in fetched] == [(0,), (1,)]
    assert broker.client.hlen(f"{broker.namespace}:default.msgs") == 2


def test_a_delayed_one_round_trip_enqueue_goes_to_the_delay_queue_with_its_eta():
    broker = dramatiq.get_broker()
    message = dramatiq.Message(queue_name="default", actor_name="noop", args=(), kwargs={}, options={})

    delayed = broker.enqueue(message, delay=60_000)

    assert delayed.queue_name == "default.DQ" and delayed.options["eta"] > time.time() * 1000 + 59_000
    assert broker.client.lrange(f"{broker.namespace}:default.DQ", 0, -1) == [delayed.options["redis_message_id"].encode()]
