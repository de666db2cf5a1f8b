"""``jobs.publisher``: pushes leave in order, and nothing silences the process for long.

Real Redis behind a TCP relay that can swallow a connection: a half-open
connection (the peer gone without a FIN) looks exactly like that to the
client, which writes and waits for an answer that never comes.
"""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading

import pytest
import redis

from common.redis import get_redis
from jobs.publisher import EventPublisher
from scripts.polling import wait_until
from scripts.stack import ROOT
from tests.live_subscriber import LiveSubscriber



class SwallowingRelay:
    """Relays TCP connections to Redis, except the first ``swallow`` ones: those are accepted and never answered."""

    def __init__(self, target_host, target_port, *, swallow=1):
        self.target = (target_host, target_port)
        self.swallow = swallow
        self.accepted = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._sockets = [self._server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._sockets.append(client)
            self.accepted += 1
            if self.accepted <= self.swallow:
                continue  # held open, never read: the client's request hangs
            upstream = socket.create_connection(self.target)
            self._sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pipe(source, sink):
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass

    def close(self):
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def relay(settings):
    target = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs
    relay = SwallowingRelay(target.get("host", "127.0.0.1"), target.get("port", 6379))
    yield relay
    relay.close()


def test_a_push_that_hangs_is_abandoned_and_the_next_one_goes_out_on_a_new_connection(settings, relay):
    # Given a publisher whose first connection to Redis is half-open
    db = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs.get("db", 0)
    settings.CHANNEL_LAYERS = {
        **settings.CHANNEL_LAYERS,
        "via-relay": {
            "BACKEND": settings.CHANNEL_LAYERS["default"]["BACKEND"],
            "CONFIG": {**settings.CHANNEL_LAYERS["default"]["CONFIG"], "hosts": [f"redis://127.0.0.1:{relay.port}/{db}"]},
        },
    }
    settings.CAO_PUSH_TIMEOUT_S = 0.5
    publisher = EventPublisher("via-relay")
    job_id = "7b0f7c4e-3d7e-4a47-9d5c-7f3c1f2b9a10"

    with LiveSubscriber(job_id) as subscriber:
        # When two pushes are published, the first one on the connection that never answers
        publisher.publish(job_id, [{"type": "STEP_STARTED", "job_id": job_id, "seq": 1}])
        wait_until(lambda: relay.accepted >= 1, timeout=10, message="the publisher's first connection")
        publisher.publish(job_id, [{"type": "STEP_COMPLETED", "job_id": job_id, "seq": 2}])

        # Then the second one reaches live subscribers once the first has timed out
        assert subscriber.seqs(until={2}) == {2}
    assert relay.accepted >= 2


def test_a_full_queue_drops_its_oldest_push_first():
    publisher = EventPublisher(max_pending=2)
    queue = asyncio.Queue(maxsize=2)

    for seq in (1, 2, 3):
        publisher._offer(queue, ("job.x", [{"seq": seq}]))

    assert [queue.get_nowait()[1][0]["seq"] for _ in range(2)] == [2, 3]
    assert publisher.dropped == 1


JOB_ID = "3f1c2a9e-8b7d-4c6e-a5f4-0d9e8c7b6a51"


def pushed_seqs_in_order(subscriber):
    return [[event["seq"] for event in message["events"]] for message in subscriber.messages]


def test_held_pushes_sent_as_publish_commands_reach_the_layers_subscribers_in_order():
    publisher = EventPublisher()

    with LiveSubscriber(JOB_ID) as subscriber:
        with publisher.held() as pushes:
            publisher.publish(JOB_ID, [{"type": "STEP_COMPLETED", "job_id": JOB_ID, "seq": 1}])
            publisher.publish(JOB_ID, [{"type": "STEP_STARTED", "job_id": JOB_ID, "seq": 2}])
            calls = pushes.take_calls()
            pipeline = get_redis().pipeline(transaction=False)
            for call in calls:
                call.queue(pipeline)
            pipeline.execute()

        subscriber.seqs(until={1, 2})
        assert pushed_seqs_in_order(subscriber) == [[1], [2]]
    assert publisher._loop is None  # nothing went through the publisher's thread


def test_what_a_hold_did_not_hand_over_is_published_when_it_ends():
    publisher = EventPublisher()

    with LiveSubscriber(JOB_ID) as subscriber:
        with publisher.held():
            publisher.publish(JOB_ID, [{"type": "JOB_COMPLETED", "job_id": JOB_ID, "seq": 5}])
            assert publisher._loop is None  # held, not queued

        assert subscriber.seqs(until={5}) == {5}


@pytest.mark.parametrize("layer", [
    {"hosts": ["redis://127.0.0.1:6390/0"]},  # another Redis
    {"BACKEND": "channels.layers.InMemoryChannelLayer"},
])
def test_a_layer_publish_commands_cannot_reach_gets_none_and_its_pushes_go_through_the_publisher(settings, layer):
    default = settings.CHANNEL_LAYERS["default"]
    settings.CHANNEL_LAYERS = {
        **settings.CHANNEL_LAYERS,
        "elsewhere": {
            "BACKEND": layer.get("BACKEND", default["BACKEND"]),
            "CONFIG": {} if "BACKEND" in layer else {**default["CONFIG"], **layer},
        },
    }
    publisher = EventPublisher("elsewhere")

    with publisher.held() as pushes:
        publisher.publish(JOB_ID, [{"seq": 1}])
        assert pushes.take_calls() == []
        assert publisher._loop is None

    assert publisher._loop is not None  # released to the publisher's thread


# A green worker's publisher, in a process of its own monkey-patched as one
# is: what it publishes, and whether it ever started the publisher's thread.
GREEN_PUBLISHER = r"""
from gevent import monkey; monkey.patch_all()
import json, sys, time
import django; django.setup()
import gevent
from common import green
from jobs.publisher import EventPublisher

assert green.active()
job_id, pauses = sys.argv[1], json.loads(sys.argv[2])
publisher = EventPublisher()

def wait(condition):
    deadline = time.monotonic() + 20
    while not condition():
        assert time.monotonic() < deadline, "the sender did not get there within 20 s"
        gevent.sleep(0.01)

for seq in range(1, int(sys.argv[3]) + 1):
    publisher.publish(job_id, [{"type": "STEP_STARTED", "job_id": job_id, "seq": seq}])
    if str(seq) in pauses:
        # Until the sender is sending (it runs while this greenlet waits), or done.
        wait(lambda: publisher.green_sender()._sending if pauses[str(seq)] == "sending" else publisher.green_sender().idle)
wait(lambda: publisher.green_sender().idle)
print(json.dumps({"publisher_thread": publisher._loop is not None, "dropped": publisher.dropped}))
"""


def run_green_publisher(job_id, *, pushes, pauses=None, env=None):
    done = subprocess.run(
        [sys.executable, "-c", GREEN_PUBLISHER, job_id, json.dumps(pauses or {}), str(pushes)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "cao_project.settings", **(env or {})},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_green_process_sends_its_pushes_in_order_from_a_greenlet_not_the_publishers_thread():
    with LiveSubscriber(JOB_ID) as subscriber:
        # Pauses split the pushes into batches of several sizes.
        result = run_green_publisher(JOB_ID, pushes=40, pauses={"1": "idle", "7": "idle", "25": "idle"})

        subscriber.seqs(until=set(range(1, 41)))
        assert [seq for seqs in pushed_seqs_in_order(subscriber) for seq in seqs] == list(range(1, 41))
    assert result == {"publisher_thread": False, "dropped": 0}


def test_a_green_process_whose_push_hangs_gives_it_up_and_sends_the_next_on_a_new_connection(settings, relay):
    db = redis.Redis.from_url(settings.REDIS_URL).connection_pool.connection_kwargs.get("db", 0)

    with LiveSubscriber(JOB_ID) as subscriber:
        # The first push goes out on a connection that never answers; the second while it hangs
        result = run_green_publisher(
            JOB_ID, pushes=2, pauses={"1": "sending"},
            env={"REDIS_URL": f"redis://127.0.0.1:{relay.port}/{db}", "CAO_PUSH_TIMEOUT_S": "0.5"},
        )

        # Then the second one reaches live subscribers once the first has timed out
        assert subscriber.seqs(until={2}) == {2}
    assert relay.accepted >= 2
    assert result["publisher_thread"] is False
