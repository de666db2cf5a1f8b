"""``jobs.publisher``: pushes leave in order, and nothing silences the process for long.

Real Redis behind a TCP relay that can swallow a connection: a half-open
connection (the peer gone without a FIN) looks exactly like that to the
client, which writes and waits for an answer that never comes.
"""

import asyncio
import socket
import threading

import pytest
import redis

from common.redis import get_redis
from jobs.publisher import EventPublisher
from scripts.polling import wait_until
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
