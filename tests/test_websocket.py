"""``/ws/<job_id>``: authentication, replay, live events, gap filling (Channels' communicator)."""

import asyncio
import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.db import connection

from cao_project.asgi import application
from jobs.consumers import CLOSE_BAD_REQUEST, CLOSE_NOT_FOUND, CLOSE_UNAUTHORIZED
from jobs.events import append_events, event
from jobs.models import EventType, Job, JobEvent, JobStatus
from jobs.monitor import monitor_token
from jobs.publisher import get_publisher
from orchestration.commands import submit_job

pytestmark = pytest.mark.django_db(transaction=True)


def path(job_id, token=None, after=None):
    query = []
    if token is not None:
        query.append(f"token={token}")
    if after is not None:
        query.append(f"after={after}")
    return f"/ws/{job_id}" + ("?" + "&".join(query) if query else "")


async def receive_until(communicator, predicate, timeout=10):
    """Messages up to and including the first one matching ``predicate``."""
    messages = []
    while True:
        message = await communicator.receive_json_from(timeout=timeout)
        messages.append(message)
        if predicate(message):
            return messages


async def open_socket(url, **scope):
    communicator = WebsocketCommunicator(application, url)
    communicator.scope.update(scope)
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def in_thread(function, *args, **kwargs):
    """Run database code from async test code, closing the throwaway thread's connection."""

    def run():
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()

    return await asyncio.to_thread(run)


def new_job(registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    return Job.objects.get(pk=job.pk)


def fake_events(job, count, *, publish=True):
    """Append ``count`` events to the job's log, as the engine would."""
    from django.db import transaction

    with transaction.atomic():
        locked = Job.objects.select_for_update().get(pk=job.pk)
        if not publish:
            payloads = []
            for _ in range(count):
                locked.last_event_seq += 1
                payload = {"type": "STEP_STARTED", "job_id": str(job.pk), "seq": locked.last_event_seq}
                JobEvent.objects.create(
                    job=locked, seq=locked.last_event_seq, type="STEP_STARTED", payload=payload,
                    created_at=locked.created_at,
                )
                payloads.append(payload)
            locked.save(update_fields=["last_event_seq"])
            return payloads
        payloads = append_events(
            locked, *[event(EventType.STEP_STARTED, step_index=0, message=f"e{i}") for i in range(count)]
        )
        locked.save(update_fields=["last_event_seq"])
        return payloads


def test_a_late_subscriber_gets_the_snapshot_and_the_whole_history(registry):
    job = new_job(registry)
    fake_events(job, 5)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        hello = await socket.receive_json_from()
        history = [await socket.receive_json_from() for _ in range(5)]
        assert await socket.receive_nothing(0.2)
        await socket.disconnect()
        return hello, history

    hello, history = async_to_sync(scenario)()

    assert hello["type"] == "WS_CONNECTED"
    assert (hello["status"], hello["current_step_index"], hello["total_steps"], hello["last_seq"]) == (
        "PENDING", 0, 4, 5,
    )
    assert [e["seq"] for e in history] == [1, 2, 3, 4, 5]
    assert history[0]["step_name"] == "prompt_enhancer" and history[0]["total_steps"] == 4


def test_sockets_opening_together_read_the_database_side_by_side(registry, monkeypatch):
    # Each socket's read waits until the other's has started too: on one
    # shared thread (channels' default), the second could never start.
    import threading

    from jobs import selectors

    jobs = [new_job(registry) for _ in range(2)]
    both_reading = threading.Barrier(len(jobs), timeout=10)
    job_get = selectors.job_get

    def job_get_alongside(*args, **kwargs):
        both_reading.wait()
        return job_get(*args, **kwargs)

    monkeypatch.setattr(selectors, "job_get", job_get_alongside)

    async def scenario():
        sockets = await asyncio.gather(*(open_socket(path(job.pk, monitor_token(job.pk))) for job in jobs))
        hellos = [await socket.receive_json_from(timeout=15) for socket in sockets]
        for socket in sockets:
            await socket.disconnect()
        return hellos

    hellos = async_to_sync(scenario)()

    assert [hello["type"] for hello in hellos] == ["WS_CONNECTED"] * 2
    assert [hello["job_id"] for hello in hellos] == [str(job.pk) for job in jobs]


def test_reconnecting_with_after_gets_exactly_the_missed_events(registry):
    job = new_job(registry)
    fake_events(job, 6)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk), after=4))
        await socket.receive_json_from()
        missed = [await socket.receive_json_from() for _ in range(2)]
        assert await socket.receive_nothing(0.2)
        await socket.disconnect()
        return missed

    assert [e["seq"] for e in async_to_sync(scenario)()] == [5, 6]


def test_live_events_follow_the_replay_without_duplicates(registry):
    job = new_job(registry)
    fake_events(job, 2)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()
        seqs = [(await socket.receive_json_from())["seq"] for _ in range(2)]
        # An event pushed twice (e.g. a retried push) is delivered once.
        await in_thread(fake_events, job, 3)
        pushed = await in_thread(lambda: list(JobEvent.objects.filter(job=job, seq=3).values_list("payload", flat=True)))
        get_publisher().publish(str(job.pk), pushed)
        seqs += [(await socket.receive_json_from())["seq"] for _ in range(3)]
        assert await socket.receive_nothing(0.3)
        await socket.disconnect()
        return seqs

    assert async_to_sync(scenario)() == [1, 2, 3, 4, 5]


def test_a_lost_push_is_filled_from_the_log(registry):
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()
        # Two events are committed but their push is lost; the third arrives.
        await in_thread(fake_events, job, 2, publish=False)
        await in_thread(fake_events, job, 1)
        seqs = [(await socket.receive_json_from())["seq"] for _ in range(3)]
        await socket.disconnect()
        return seqs

    assert async_to_sync(scenario)() == [1, 2, 3]


@pytest.mark.parametrize(
    "make_url, code",
    [
        (lambda job: path(job.pk), CLOSE_UNAUTHORIZED),
        (lambda job: path(job.pk, "garbage"), CLOSE_UNAUTHORIZED),
        (lambda job: path(job.pk, monitor_token(uuid.uuid4())), CLOSE_UNAUTHORIZED),
        (lambda job: path(job.pk, monitor_token(job.pk), after="x"), CLOSE_BAD_REQUEST),
        (lambda job: path(job.pk, monitor_token(job.pk), after="-3"), CLOSE_BAD_REQUEST),
        (lambda job: path(uuid.UUID(int=7), monitor_token(uuid.UUID(int=7))), CLOSE_NOT_FOUND),
        (lambda job: path("not-a-uuid", monitor_token("not-a-uuid")), CLOSE_NOT_FOUND),
    ],
)
def test_refused_connections_close_with_a_distinct_code(registry, make_url, code):
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(make_url(job))
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)() == {"type": "websocket.close", "code": code}


def test_an_expired_token_is_refused(registry, settings):
    job = new_job(registry)
    token = monitor_token(job.pk)
    settings.CAO_MONITOR_TOKEN_MAX_AGE_S = -1

    async def scenario():
        socket = await open_socket(path(job.pk, token))
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)()["code"] == CLOSE_UNAUTHORIZED


def staff_scope(make_staff, origin, *permissions, host=b"localhost:8000"):
    user = make_staff("ops", *(permissions or ("jobs.view_job",)))
    return {"user": user, "headers": [(b"origin", origin.encode()), (b"host", host)]}


def test_staff_sessions_from_our_own_pages_need_no_token(registry, make_staff):
    job = new_job(registry)
    scope = staff_scope(make_staff, "http://localhost:8000")

    async def scenario():
        socket = await open_socket(path(job.pk), **scope)
        hello = await socket.receive_json_from()
        await socket.disconnect()
        return hello

    assert async_to_sync(scenario)()["type"] == "WS_CONNECTED"


def test_staff_sessions_from_another_site_are_refused(registry, make_staff):
    job = new_job(registry)
    scope = staff_scope(make_staff, "https://evil.example")

    async def scenario():
        socket = await open_socket(path(job.pk), **scope)
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)()["code"] == CLOSE_UNAUTHORIZED


@pytest.mark.parametrize(
    "origin, host",
    [
        ("http://localhost:9999", b"localhost:8000"),  # the same host, another port
        ("https://127.0.0.1:1", b"127.0.0.1:8000"),  # another scheme and port
        ("https://localhost:8000", b"localhost:8000"),  # another scheme only
        ("http://localhost:8000", b"evil.example:8000"),  # a Host that is not ours
        ("null", b"localhost:8000"),  # a sandboxed or file:// page
    ],
)
def test_staff_sessions_are_refused_unless_the_full_origin_is_ours(registry, make_staff, origin, host):
    job = new_job(registry)
    scope = staff_scope(make_staff, origin, host=host)

    async def scenario():
        socket = await open_socket(path(job.pk), **scope)
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)()["code"] == CLOSE_UNAUTHORIZED


def test_staff_sessions_need_the_view_permission_even_from_our_pages(registry, make_staff):
    job = new_job(registry)
    scope = staff_scope(make_staff, "http://localhost:8000", "jobs.add_job")

    async def scenario():
        socket = await open_socket(path(job.pk), **scope)
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)()["code"] == CLOSE_UNAUTHORIZED


def test_anonymous_users_without_a_token_are_refused(registry):
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(path(job.pk), user=AnonymousUser())
        return await socket.receive_output(timeout=5)

    assert async_to_sync(scenario)()["code"] == CLOSE_UNAUTHORIZED


def test_a_job_runs_live_to_completion_and_the_socket_stays_usable(registry, simulator, worker):
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        messages = await receive_until(socket, lambda m: m["type"] == "JOB_COMPLETED", timeout=20)
        await socket.send_json_to({"type": "ping"})
        pong = await socket.receive_json_from()
        await socket.disconnect()
        return messages, pong

    messages, pong = async_to_sync(scenario)()

    events = messages[1:]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] for e in events][-1] == "JOB_COMPLETED"
    assert sum(e["type"] == "STEP_COMPLETED" for e in events) == 4
    assert pong == {"type": "pong", "last_seq": len(events)}
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED
