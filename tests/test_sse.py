"""``GET /api/v1/jobs/<id>/stream`` (Server-Sent Events) over a real ASGI server (uvicorn) and a real HTTP client.

Jobs run on a real Dramatiq worker against the real simulator. Every read
of the stream has a deadline (READ_TIMEOUT_S: no byte for that long fails
the test), and every other wait is on a condition with one.
"""

import json
import os
import re
import socket
import subprocess
import threading
from pathlib import Path

import pytest
import redis
import requests
from asgiref.sync import async_to_sync, iscoroutinefunction
from channels.layers import get_channel_layer
from django.db import connection, connections
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from websockets.sync.client import connect as ws_connect

from api_keys.models import ApiKey
from common.redis import get_redis
from cao_project.asgi import STREAM_PATHS
from jobs import live_reads
from jobs.models import EventType, Job, JobEvent, JobStatus
from jobs.monitor import monitor_token
from jobs.publisher import group_name
from orchestration import commands
from orchestration.commands import submit_job
from scripts.polling import wait_until
from tests.gate import GatedService
from tests.job_api import create_job
from tests.live_subscriber import group_subscribers
from tests.test_websocket import fake_events

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# No byte from the server for this long fails the test (keep-alives come every 15 s by default).
READ_TIMEOUT_S = 10
RETRY_FRAME = "retry: 3000\n\n"
KEEP_ALIVE_FRAME = ": keep-alive\n\n"
README = Path(__file__).resolve().parent.parent / "README.md"


class Frame:
    """One frame of a text/event-stream: its text as sent, its fields, and the comment if it is one."""

    def __init__(self, raw):
        self.raw = raw
        self.fields = {}
        self.comment = None
        for line in raw[:-2].split("\n"):
            if line.startswith(":"):
                self.comment = line[1:].strip()
                continue
            name, _, value = line.partition(":")
            self.fields[name] = value[1:] if value.startswith(" ") else value

    @property
    def event(self):
        return json.loads(self.fields["data"])

    def __repr__(self):
        return f"Frame({self.raw!r})"


class Stream:
    """A streaming response read frame by frame, as an EventSource reads it."""

    def __init__(self, response):
        self.response = response
        self._chunks = response.iter_content(chunk_size=None)
        self._buffer = b""

    def frame(self):
        """The next frame, or None once the server has closed the stream."""
        while b"\n\n" not in self._buffer:
            chunk = next(self._chunks, None)
            if chunk is None:
                assert not self._buffer, f"the stream closed in the middle of a frame: {self._buffer!r}"
                return None
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\n\n", 1)
        return Frame(raw.decode() + "\n\n")

    def events(self, count):
        """The next ``count`` event frames (keep-alives skipped)."""
        frames = []
        while len(frames) < count:
            frame = self.frame()
            assert frame is not None, f"the stream closed after {frames}"
            if frame.comment is None:
                frames.append(frame)
        return frames

    def events_until_closed(self, *, at_most=200):
        """Every event frame up to the server closing the stream (keep-alives skipped)."""
        frames = []
        while (frame := self.frame()) is not None:
            assert len(frames) < at_most, "the stream never closed"
            if frame.comment is None:
                frames.append(frame)
        return frames

    def close(self):
        self.response.close()


def stream_url(server, job_id):
    return f"{server.base_url}/api/v1/jobs/{job_id}/stream"


def get_stream(server, job_id, *, key=None, headers=None, params=None):
    """The raw response of the stream endpoint (not read yet)."""
    sent = {"Accept": "text/event-stream", **(headers or {})}
    if key is not None:
        sent["X-API-Key"] = key.raw_key
    return requests.get(
        stream_url(server, job_id), headers=sent, params=params, stream=True, timeout=(5, READ_TIMEOUT_S)
    )


def open_stream(server, job_id, **kwargs):
    """A stream that answered 200 and sent its ``retry`` frame."""
    response = get_stream(server, job_id, **kwargs)
    assert response.status_code == 200, response.text
    stream = Stream(response)
    assert stream.frame().raw == RETRY_FRAME
    return stream


def stored_events(job):
    return list(JobEvent.objects.filter(job_id=job.pk).order_by("seq").values_list("payload", flat=True))


def group_members(redis_client, job):
    """Processes subscribed to the job's group (the server's streams share its one subscription)."""
    return group_subscribers(redis_client, job.pk)


def job_of(key, **kwargs):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"}, owner=key, **kwargs)
    return Job.objects.get(pk=job.pk)


@pytest.fixture
def gate(worker, settings):
    """prompt_enhancer's calls held until the test opens the gate (closed before the worker stops)."""
    with GatedService() as service:
        settings.CAO_SERVICE_URL_OVERRIDES = {**settings.CAO_SERVICE_URL_OVERRIDES, "prompt_enhancer": service.base_url}
        yield service


@pytest.fixture
def finished_job(registry, simulator, worker, client_key, wait):
    """A business_plan job run to completion by the worker against the simulator."""
    job = job_of(client_key)
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED, message="the job to complete")
    job.refresh_from_db()
    return job


# --- The format, replay then live, the end ------------------------------------------------------


def test_a_running_job_streams_every_event_once_in_order_then_the_stream_closes(
    registry, simulator, worker, asgi_server, gate, client_key, settings
):
    # Given a job whose first call is held in flight, and no resync: live events can only come pushed
    settings.CAO_WS_RESYNC_S = 0
    job = job_of(client_key)
    gate.wait_in_flight(1)
    quiet_seq = Job.objects.get(pk=job.pk).last_event_seq
    assert quiet_seq >= 1

    # When a client opens the stream, reads what happened so far, and the call is let through
    response = get_stream(asgi_server, job.pk, key=client_key)
    stream = Stream(response)
    first = stream.frame()
    replayed = stream.events(quiet_seq)
    gate.open()
    live = stream.events_until_closed()

    # Then it got the headers, the retry field, and every stored event once, in order, ending with JOB_COMPLETED
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    assert first.raw == RETRY_FRAME
    frames = replayed + live
    events = stored_events(job)
    assert [frame.event for frame in frames] == events
    assert [event["seq"] for event in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "JOB_COMPLETED"
    assert sum(event["type"] == "STEP_COMPLETED" for event in events) == 4
    assert len(live) > 1  # events that did not exist when the stream opened came live
    # And each frame is exactly id, event and data lines
    for frame, event in zip(frames, events):
        assert frame.raw == f"id: {event['seq']}\nevent: {event['type']}\ndata: {frame.fields['data']}\n\n"
    # And the server closed the stream after the final event (events_until_closed returned)
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED


def test_a_finished_job_replays_exactly_what_the_websocket_sends_then_closes(finished_job, asgi_server, client_key):
    stream = open_stream(asgi_server, finished_job.pk, key=client_key)
    frames = stream.events_until_closed()

    ws_url = f"{asgi_server.ws_url}/ws/{finished_job.pk}?token={monitor_token(finished_job.pk, key=client_key)}"
    with ws_connect(ws_url, open_timeout=10) as socket_:
        assert json.loads(socket_.recv(timeout=10))["type"] == "WS_CONNECTED"
        sent_by_websocket = [socket_.recv(timeout=10) for _ in range(finished_job.last_event_seq)]

    # The same JSON text, event for event: the data line is the WebSocket message
    assert [frame.fields["data"] for frame in frames] == sent_by_websocket
    assert [frame.event["seq"] for frame in frames] == list(range(1, finished_job.last_event_seq + 1))
    assert frames[-1].fields["event"] == "JOB_COMPLETED"


@pytest.mark.parametrize(
    "headers, params",
    [
        ({"Last-Event-ID": "3"}, None),
        (None, {"after": "3"}),
        ({"Last-Event-ID": "3"}, {"after": "1"}),  # the header wins
    ],
    ids=["last-event-id", "after", "header-wins"],
)
def test_resuming_gets_exactly_the_events_after_the_resume_point(finished_job, asgi_server, client_key, headers, params):
    stream = open_stream(asgi_server, finished_job.pk, key=client_key, headers=headers, params=params)

    seqs = [int(frame.fields["id"]) for frame in stream.events_until_closed()]

    assert seqs == list(range(4, finished_job.last_event_seq + 1))


@pytest.mark.parametrize(
    "resume",
    [
        lambda last: {"headers": {"Last-Event-ID": str(last)}},
        lambda last: {"params": {"after": str(last)}},
        lambda last: {"headers": {"Last-Event-ID": str(last + 7)}},
    ],
    ids=["at-the-end", "after-param", "beyond-the-end"],
)
def test_a_client_already_past_the_finishing_event_gets_204(finished_job, asgi_server, client_key, resume):
    response = get_stream(asgi_server, finished_job.pk, key=client_key, **resume(finished_job.last_event_seq))

    assert response.status_code == 204
    assert response.content == b""


def test_one_event_short_of_the_end_gets_that_event_then_the_stream_closes(finished_job, asgi_server, client_key):
    last = finished_job.last_event_seq
    stream = open_stream(asgi_server, finished_job.pk, key=client_key, headers={"Last-Event-ID": str(last - 1)})

    assert [frame.fields["event"] for frame in stream.events_until_closed()] == ["JOB_COMPLETED"]


def test_a_failed_job_ends_the_stream_after_its_job_error_and_a_reconnect_gets_204(
    registry, simulator, worker, asgi_server, client_key
):
    # Given a job whose second service rejects its call (a failure that is not retried)
    simulator.configure(fail={"fast_chat_llm": "400"})
    job = job_of(client_key)

    # When a client follows it
    frames = open_stream(asgi_server, job.pk, key=client_key).events_until_closed()

    # Then the stream ends after JOB_ERROR, and reconnecting from there is 204 (an EventSource stops)
    assert frames[-1].fields["event"] == "JOB_ERROR"
    assert [frame.event for frame in frames] == stored_events(job)
    assert Job.objects.get(pk=job.pk).status == JobStatus.FAILED
    again = get_stream(asgi_server, job.pk, key=client_key, headers={"Last-Event-ID": frames[-1].fields["id"]})
    assert again.status_code == 204


def test_a_resumed_failure_does_not_end_the_replay(registry, simulator, worker, asgi_server, client_key, wait):
    # Given a job that failed once (its first call to fast_chat_llm was rejected), was resumed, and completed
    simulator.configure(fail={"fast_chat_llm": "400x1"})
    job = job_of(client_key)
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.FAILED, message="the job to fail")
    commands.resume_job(job_id=job.pk, owner=client_key, is_staff=True, force=True)
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED, message="the resumed job to complete")

    # When a client replays it from the start
    frames = open_stream(asgi_server, job.pk, key=client_key).events_until_closed()

    # Then the stream went past the JOB_ERROR and ended after JOB_COMPLETED
    types = [frame.fields["event"] for frame in frames]
    assert "JOB_ERROR" in types and types[types.index("JOB_ERROR") + 1] == "JOB_RESUMED"
    assert types[-1] == "JOB_COMPLETED"
    assert [frame.event for frame in frames] == stored_events(job)


def test_a_cancelled_job_ends_the_stream_and_its_late_step_record_does_not_reopen_it(
    registry, worker, asgi_server, gate, client_key, wait
):
    # Given a job whose first call is in flight, and a client following it
    job = job_of(client_key)
    gate.wait_in_flight(1)
    stream = open_stream(asgi_server, job.pk, key=client_key)

    # When the job is cancelled through the API
    cancelled = requests.post(
        f"{asgi_server.base_url}/api/v1/jobs/{job.pk}/cancel", headers={"X-API-Key": client_key.raw_key}, timeout=10
    )
    assert cancelled.status_code == 200, cancelled.text
    frames = stream.events_until_closed()

    # Then the stream ends after JOB_CANCELLED
    assert frames[-1].fields["event"] == "JOB_CANCELLED"
    # And once the call in flight has recorded its result after it, reconnecting from JOB_CANCELLED is still 204
    gate.open()
    wait(
        lambda: JobEvent.objects.filter(job_id=job.pk, type=EventType.STEP_COMPLETED).exists(),
        message="the late STEP_COMPLETED",
    )
    assert Job.objects.get(pk=job.pk).last_event_seq > int(frames[-1].fields["id"])
    again = get_stream(asgi_server, job.pk, key=client_key, headers={"Last-Event-ID": frames[-1].fields["id"]})
    assert again.status_code == 204


def test_a_quiet_stream_sends_keep_alive_comments(registry, asgi_server, client_key, settings):
    settings.CAO_SSE_KEEPALIVE_S = 0.2
    job = job_of(client_key)  # no worker: the job says nothing
    stream = open_stream(asgi_server, job.pk, key=client_key)

    frames = [stream.frame() for _ in range(2)]
    stream.close()

    assert [frame.raw for frame in frames] == [KEEP_ALIVE_FRAME, KEEP_ALIVE_FRAME]


# --- Lost pushes ---------------------------------------------------------------------------------


def test_lost_pushes_are_filled_from_the_log_when_the_next_one_arrives(registry, asgi_server, client_key, settings):
    # Given a stream that has replayed a job's one event, and no resync: only the gap fill can recover a lost push
    settings.CAO_WS_RESYNC_S = 0
    job = job_of(client_key)
    fake_events(job, 1, publish=False)
    stream = open_stream(asgi_server, job.pk, key=client_key)
    replayed = stream.events(1)

    # When two events are committed but their push is lost, then a fourth is pushed (twice), then a fifth
    fake_events(job, 2, publish=False)
    fourth = fake_events(job, 1)
    async_to_sync(get_channel_layer().group_send)(group_name(job.pk), {"type": "job.events", "events": fourth})
    fake_events(job, 1)
    frames = stream.events(4)
    stream.close()

    # Then the client got 2 and 3 from the log before 4, and every seq once, in order
    assert [int(frame.fields["id"]) for frame in replayed + frames] == [1, 2, 3, 4, 5]
    assert [frame.event for frame in replayed + frames] == stored_events(job)


def test_a_push_that_overtook_a_lost_one_gets_it_from_the_log_once_the_reorder_wait_is_over(
    registry, asgi_server, client_key, settings
):
    # Given a stream that has replayed a job's one event, no resync, and no push after the next one
    settings.CAO_WS_RESYNC_S = 0
    settings.CAO_FOLLOW_REORDER_WAIT_S = 0.3
    job = job_of(client_key)
    fake_events(job, 1, publish=False)
    stream = open_stream(asgi_server, job.pk, key=client_key)
    replayed = stream.events(1)

    # When event 2 is committed but its push is lost, and 3 is pushed
    fake_events(job, 1, publish=False)
    third = fake_events(job, 1, publish=False)
    async_to_sync(get_channel_layer().group_send)(group_name(job.pk), {"type": "job.events", "events": third})
    frames = stream.events(2)
    stream.close()

    # Then, with nothing else to wake it, the stream reads 2 from the log and sends it before 3
    assert [int(frame.fields["id"]) for frame in replayed + frames] == [1, 2, 3]
    assert [frame.event for frame in replayed + frames] == stored_events(job)


def test_a_lost_final_push_arrives_by_the_resync_and_the_stream_closes(registry, asgi_server, client_key, settings):
    # Given a stream that has replayed a job's one event
    settings.CAO_WS_RESYNC_S = 0.2
    job = job_of(client_key)
    fake_events(job, 1, publish=False)
    stream = open_stream(asgi_server, job.pk, key=client_key)
    assert [frame.fields["id"] for frame in stream.events(1)] == ["1"]

    # When the job's last events are committed and no push is ever sent
    fake_events(job, 1, publish=False)
    Job.objects.filter(pk=job.pk).update(last_event_seq=3, status=JobStatus.COMPLETED)
    final = {"type": "JOB_COMPLETED", "job_id": str(job.pk), "seq": 3, "message": "done", "total_steps": 4}
    JobEvent.objects.create(job_id=job.pk, seq=3, type="JOB_COMPLETED", payload=final, created_at=job.created_at)

    # Then they arrive within the resync interval, and the stream closes after the final one
    assert [frame.event for frame in stream.events_until_closed()] == stored_events(job)[1:]


@pytest.mark.timeout(120)
def test_a_stream_outlasts_a_channel_layer_outage_and_rejoins_its_group(
    registry, asgi_server, client_key, settings, private_redis, wait
):
    # Given a stream whose channel layer is a Redis of this test's own
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
            "CONFIG": {"hosts": [private_redis.url(0)], "prefix": "cao:ws"},
        }
    }
    settings.CAO_WS_RESYNC_S = 0.2
    layer_redis = redis.Redis.from_url(private_redis.url(0))
    job = job_of(client_key)
    stream = open_stream(asgi_server, job.pk, key=client_key)
    wait(lambda: group_members(layer_redis, job) == 1, message="the stream in its job's group")

    # When that Redis goes down, an event is committed meanwhile, and Redis comes back empty
    private_redis.stop(kill=True)
    fake_events(job, 1, publish=False)
    during = stream.events(1)
    private_redis.start()
    wait(lambda: group_members(layer_redis, job) == 1, message="the stream back in its job's group")
    pushed = {"type": "STEP_STARTED", "job_id": str(job.pk), "seq": 2, "pushed": True}
    async_to_sync(get_channel_layer().group_send)(group_name(job.pk), {"type": "job.events", "events": [pushed]})
    after = stream.events(1)
    stream.close()

    # Then the stream stayed open: it read the event from the log while Redis was down, and live pushes reach it again
    assert during[0].event["seq"] == 1
    assert after[0].event == pushed


def wait_until_member(job):
    wait_until(lambda: group_members(get_redis(), job) >= 1, timeout=10, message="the stream in its job's group")


# --- Authentication, errors, throttling ----------------------------------------------------------


def test_no_credentials_get_the_job_apis_401(registry, asgi_server, client_key):
    job = job_of(client_key)

    stream = requests.get(stream_url(asgi_server, job.pk), timeout=10)
    detail = requests.get(f"{asgi_server.base_url}/api/v1/jobs/{job.pk}", timeout=10)

    assert stream.status_code == detail.status_code == 401
    assert stream.json() == detail.json()
    assert stream.json()["success"] is False and stream.json()["error"]["code"] == "NOT_AUTHENTICATED"
    assert stream.headers["WWW-Authenticate"] == detail.headers["WWW-Authenticate"]


def test_another_keys_job_is_a_404_as_the_job_api_answers_it(registry, asgi_server, client_key):
    job = job_of(client_key)
    other, raw_key = ApiKey.objects.create_key(name="other")
    other.raw_key = raw_key

    stream = get_stream(asgi_server, job.pk, key=other)
    detail = requests.get(f"{asgi_server.base_url}/api/v1/jobs/{job.pk}", headers={"X-API-Key": raw_key}, timeout=10)

    assert stream.status_code == detail.status_code == 404
    assert stream.json() == detail.json()
    assert stream.json()["error"]["code"] == "JOB_NOT_FOUND"


@pytest.mark.parametrize("job_id", ["00000000-0000-0000-0000-000000000007", "not-a-uuid"])
def test_an_unknown_job_is_a_404(registry, asgi_server, client_key, job_id):
    response = get_stream(asgi_server, job_id, key=client_key)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "JOB_NOT_FOUND"


def test_the_token_of_monitor_url_opens_the_stream_without_any_header(registry, asgi_server, client_key):
    # Given the monitor_url the API gave when the job was created
    job_id, token = create_job(asgi_server.base_url, client_key.raw_key)
    job = Job.objects.get(pk=job_id)

    # When a client that can send no header (a browser's EventSource) opens the stream with it
    response = requests.get(
        stream_url(asgi_server, job.pk), params={"token": token}, stream=True, timeout=(5, READ_TIMEOUT_S)
    )
    stream = Stream(response)
    assert stream.frame().raw == RETRY_FRAME
    wait_until_member(job)
    fake_events(job, 2)

    # Then it streams the job's events
    assert [frame.event for frame in stream.events(2)] == stored_events(job)
    stream.close()


def deactivated_key_token(job, key):
    ApiKey.objects.filter(pk=key.pk).update(is_active=False)
    return monitor_token(job.pk, key=key)


@pytest.mark.parametrize(
    "make_token",
    [
        lambda job, key: "garbage",
        lambda job, key: monitor_token("00000000-0000-0000-0000-000000000007", key=key),  # another job's
        deactivated_key_token,
    ],
    ids=["garbage", "another-job", "deactivated-key"],
)
def test_a_wrong_token_is_a_401(registry, asgi_server, client_key, make_token):
    job = job_of(client_key)

    response = requests.get(stream_url(asgi_server, job.pk), params={"token": make_token(job, client_key)}, timeout=10)

    assert response.status_code == 401
    assert response.json()["success"] is False
    assert response.json()["error"]["code"] == "AUTHENTICATION_FAILED"


def test_an_expired_token_is_a_401(registry, asgi_server, client_key, settings):
    job = job_of(client_key)
    token = monitor_token(job.pk, key=client_key)
    settings.CAO_MONITOR_TOKEN_MAX_AGE_S = -1

    response = requests.get(stream_url(asgi_server, job.pk), params={"token": token}, timeout=10)

    assert response.status_code == 401


@pytest.mark.parametrize(
    "permissions, status",
    [(("jobs.view_job",), 200), (("jobs.add_job",), 403)],
    ids=["may-view", "may-not-view"],
)
def test_staff_sessions_get_what_the_job_api_gives_them(registry, asgi_server, client_key, make_staff, permissions, status):
    job = job_of(client_key)
    browser = Client()
    browser.force_login(make_staff("ops", *permissions))
    cookies = {"sessionid": browser.cookies["sessionid"].value}

    response = requests.get(stream_url(asgi_server, job.pk), cookies=cookies, stream=True, timeout=(5, READ_TIMEOUT_S))
    detail = requests.get(f"{asgi_server.base_url}/api/v1/jobs/{job.pk}", cookies=cookies, timeout=10)

    assert response.status_code == detail.status_code == status
    if status == 200:
        assert Stream(response).frame().raw == RETRY_FRAME
    else:
        assert response.json() == detail.json()
    response.close()


@pytest.mark.parametrize(
    "headers, params, field",
    [
        (None, {"after": "x"}, "after"),
        (None, {"after": "-1"}, "after"),
        (None, {"after": "1.5"}, "after"),
        (None, {"after": ""}, "after"),
        (None, {"after": "99999999999"}, "after"),
        ({"Last-Event-ID": "abc"}, None, "Last-Event-ID"),
        ({"Last-Event-ID": "-3"}, {"after": "2"}, "Last-Event-ID"),
    ],
)
def test_a_malformed_resume_point_is_a_400_in_the_error_shape(registry, asgi_server, client_key, headers, params, field):
    job = job_of(client_key)

    response = get_stream(asgi_server, job.pk, key=client_key, headers=headers, params=params)

    assert response.status_code == 400
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "INVALID_INPUT"
    assert body["error"]["details"] == {field: "invalid"}
    assert field in body["error"]["message"]


def test_streams_are_throttled_with_the_job_api(registry, asgi_server, client_key, settings):
    settings.CAO_THROTTLE_RATES = {"client": "2/min"}
    job = job_of(client_key)
    for _ in range(2):
        get_stream(asgi_server, job.pk, key=client_key).close()

    refused = get_stream(asgi_server, job.pk, key=client_key)

    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "THROTTLED"
    assert int(refused.headers["Retry-After"]) > 0


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_postgresql_down_before_the_stream_starts_is_the_job_apis_503(registry, asgi_server, client_key):
    # Given a job, then PostgreSQL refusing connections (the server keeps none
    # open: CONN_MAX_AGE 0, and the live readers' threads let theirs go)
    job = job_of(client_key)
    live_reads.shut_down()
    database = connections.settings["default"]
    saved = database["PORT"]
    database["PORT"] = closed_port()
    try:
        stream = get_stream(asgi_server, job.pk, key=client_key)
        detail = requests.get(
            f"{asgi_server.base_url}/api/v1/jobs/{job.pk}", headers={"X-API-Key": client_key.raw_key}, timeout=30
        )
    finally:
        database["PORT"] = saved

    assert stream.status_code == detail.status_code == 503
    assert stream.json() == detail.json()
    assert stream.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
    assert stream.headers["Retry-After"] == detail.headers["Retry-After"]


# --- What an open stream holds -------------------------------------------------------------------


def database_connections():
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def test_waiting_streams_hold_no_thread_and_no_database_connection(registry, asgi_server, client_key, redis_db, wait, settings):
    # Given database connections kept as in production (the server's threads keep theirs)
    database = connections.settings["default"]
    database["CONN_MAX_AGE"] = 600
    streams = []
    try:
        # And one open stream
        jobs = [job_of(client_key) for _ in range(12)]
        streams.append(open_stream(asgi_server, jobs[0].pk, key=client_key))
        wait(lambda: group_members(redis_db, jobs[0]) == 1, message="the first stream in its group")
        threads, held = threading.active_count(), database_connections()

        # When eleven more are opened, more than the server's pool of HTTP threads (8)
        for job in jobs[1:]:
            streams.append(open_stream(asgi_server, job.pk, key=client_key))
        wait(lambda: all(group_members(redis_db, job) == 1 for job in jobs), message="twelve streams in their groups")

        # Then they wait without a thread or a database connection each: their
        # reads ran on the live readers' few threads, fewer than the streams
        assert settings.CAO_LIVE_READ_THREADS < len(jobs) - 1
        assert threading.active_count() <= threads + settings.CAO_LIVE_READ_THREADS
        assert database_connections() <= held + settings.CAO_LIVE_READ_THREADS
        # And the streams still deliver
        for job in jobs:
            fake_events(job, 1)
        assert all(stream.events(1)[0].event["job_id"] == str(job.pk) for stream, job in zip(streams, jobs))
    finally:
        for stream in streams:
            stream.close()
        database["CONN_MAX_AGE"] = 0
        # Close what the live readers' threads kept
        live_reads.shut_down()


def test_a_client_that_goes_away_ends_its_stream_and_leaves_the_group(registry, asgi_server, client_key, redis_db, wait):
    job = job_of(client_key)
    stream = open_stream(asgi_server, job.pk, key=client_key)
    wait(lambda: group_members(redis_db, job) == 1, message="the stream in its group")

    stream.close()

    wait(lambda: group_members(redis_db, job) == 0, timeout=10, message="the stream to leave its group")


# --- Routing and the schema ----------------------------------------------------------------------


def url_patterns(resolver=None, prefix="/"):
    """(path regex text, pattern) of every route, includes followed."""
    for pattern in (resolver or get_resolver()).url_patterns:
        text = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            yield from url_patterns(pattern, text)
        elif isinstance(pattern, URLPattern):
            yield text, pattern


def test_every_async_view_is_routed_to_the_asgi_handler_and_no_other():
    routes = list(url_patterns())
    async_names = sorted(p.name for _, p in routes if iscoroutinefunction(p.callback))
    assert async_names == ["job-stream"]
    assert STREAM_PATHS.fullmatch(reverse("job-stream", kwargs={"job_id": "abc"}))
    for name in ("job-events", "job-detail", "job-cancel"):
        assert not STREAM_PATHS.fullmatch(reverse(name, kwargs={"job_id": "abc"}))


def test_the_openapi_schema_documents_the_stream():
    schema = Client().get("/api/v1/schema", {"format": "json"}).json()

    operation = schema["paths"]["/api/v1/jobs/{job_id}/stream"]["get"]
    parameters = {(parameter["in"], parameter["name"]) for parameter in operation["parameters"]}
    assert parameters == {("path", "job_id"), ("header", "Last-Event-ID"), ("query", "after"), ("query", "token")}
    assert list(operation["responses"]["200"]["content"]) == ["text/event-stream"]
    assert {"200", "204", "400", "401", "404", "503"} <= set(operation["responses"])
    assert "content" not in operation["responses"]["204"]
    for status in ("400", "401", "404"):
        error = operation["responses"][status]["content"]["application/json"]["schema"]
        assert error == {"$ref": "#/components/schemas/Error"}


# --- The README's examples, as written -----------------------------------------------------------


def readme_blocks(section, language):
    """The ``language`` code blocks of the README section titled ``section``, in order."""
    text = README.read_text().split(f"\n### {section}\n", 1)[1]
    body = re.split(r"\n##+ ", text, maxsplit=1)[0]
    return re.findall(rf"```{language}\n(.*?)```", body, re.S)


def run_readme_command(command, server, **env):
    """A README command run by bash against ``server`` instead of 127.0.0.1:8000; its output's frames."""
    command = command.replace("http://127.0.0.1:8000", server.base_url)
    done = subprocess.run(
        ["bash", "-c", command], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [Frame(raw + "\n\n") for raw in done.stdout.split("\n\n") if raw]


def test_the_readme_curl_commands_work_as_written(finished_job, asgi_server, client_key):
    follow, resume = readme_blocks("Watch it live (Server-Sent Events)", "bash")
    env = {"JOB": str(finished_job.pk), "CAO_KEY": client_key.raw_key}

    followed = run_readme_command(follow, asgi_server, **env)
    resumed = run_readme_command(resume, asgi_server, **env)

    last = finished_job.last_event_seq
    assert followed[0].raw == RETRY_FRAME and resumed[0].raw == RETRY_FRAME
    assert [int(frame.fields["id"]) for frame in followed[1:]] == list(range(1, last + 1))
    assert [int(frame.fields["id"]) for frame in resumed[1:]] == list(range(4, last + 1))
    assert followed[-1].fields["event"] == "JOB_COMPLETED"


@pytest.mark.slow
@pytest.mark.e2e
def test_stopping_the_api_cuts_its_open_streams_instead_of_waiting_for_them(testbed):
    import signal

    with testbed() as bed:
        # Given a stream open on a job whose call takes long
        bed.simulator.configure(latency={"prompt_enhancer": "60s"})
        job_id = bed.submit()
        stream = requests.get(
            f"{bed.base_url}/api/v1/jobs/{job_id}/stream", headers={"X-API-Key": bed.api_key}, stream=True, timeout=30
        )
        assert stream.status_code == 200
        lines = stream.iter_lines(decode_unicode=True)
        assert next(lines).startswith("retry:")

        # When the API process is asked to stop
        bed.stack.signal("api", signal.SIGTERM)

        # Then it exits by itself within its graceful timeout (uvicorn would
        # otherwise wait for the stream to end), and the stream is closed
        api = bed.stack.processes["api"]
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pytest.fail("the API process still runs 30 s after SIGTERM, held by an open stream")
        assert api.returncode is not None and api.returncode != -signal.SIGKILL
        with pytest.raises((requests.RequestException, StopIteration)):
            while True:
                next(lines)
