"""The last event always arrives: a socket re-reads the log on ping and on a timer.

Pushes are best effort. A lost push used to be repaired only when a later
event arrived, so a lost final JOB_COMPLETED was never recovered.
"""

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from jobs.monitor import monitor_token
from scripts.polling import wait_until
from tests.live_subscriber import group_subscribers
from tests.test_websocket import fake_events, in_thread, new_job, open_socket, path, receive_until

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_ping_answers_with_what_the_log_holds_after_sending_what_was_missed(registry, settings):
    settings.CAO_WS_RESYNC_S = 0  # the timer is off: only the ping can recover it
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()  # WS_CONNECTED
        # The job's last event is committed, but its push is lost
        await in_thread(fake_events, job, 1, publish=False)
        assert await socket.receive_nothing(0.3)
        await socket.send_json_to({"type": "ping"})
        messages = await receive_until(socket, lambda message: message["type"] == "pong")
        await socket.disconnect()
        return messages

    missed, pong = async_to_sync(scenario)()
    assert missed["seq"] == 1
    assert pong == {"type": "pong", "last_seq": 1}


def test_a_lost_final_push_arrives_by_itself_within_the_resync_interval(registry, settings):
    settings.CAO_WS_RESYNC_S = 0.2
    job = new_job(registry)

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()
        await in_thread(fake_events, job, 2, publish=False)
        seqs = [(await socket.receive_json_from(timeout=5))["seq"] for _ in range(2)]
        await socket.disconnect()
        return seqs

    assert async_to_sync(scenario)() == [1, 2]


def test_a_push_that_overtook_a_lost_one_is_held_then_the_log_fills_the_gap(registry, settings):
    # Given a socket with no resync timer: only the end of the reorder wait can recover a lost push
    settings.CAO_WS_RESYNC_S = 0
    settings.CAO_FOLLOW_REORDER_WAIT_S = 1.0
    job = new_job(registry)
    layer = get_channel_layer()

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()
        # When two events are committed and only the second one is pushed
        payloads = await in_thread(fake_events, job, 2, publish=False)
        await layer.group_send(f"job.{job.pk}", {"type": "job.events", "events": [payloads[1]]})
        held = await socket.receive_nothing(0.3)
        seqs = [(await socket.receive_json_from(timeout=5))["seq"] for _ in range(2)]
        await socket.disconnect()
        return held, seqs

    held, seqs = async_to_sync(scenario)()

    # Then the second is held back rather than sent out of order, and both arrive in order
    assert held is True
    assert seqs == [1, 2]


def test_a_socket_whose_subscription_was_cut_gets_live_pushes_again(registry, settings, redis_db):
    # Given a subscriber, then Redis drops the process's pub/sub connection (a restart or a failover does)
    settings.CAO_WS_RESYNC_S = 0  # no resync: only the restored subscription can deliver the push
    job = new_job(registry)
    layer = get_channel_layer()

    async def scenario():
        socket = await open_socket(path(job.pk, monitor_token(job.pk)))
        await socket.receive_json_from()
        await wait_for(lambda: group_subscribers(redis_db, job.pk) == 1)
        cut = await in_thread(pubsub_connections)
        await in_thread(redis_db.client_kill_filter, _type="pubsub")
        # When the layer has reconnected (a new connection, subscribed again), a push reaches the socket again
        await wait_for(lambda: pubsub_connections().isdisjoint(cut) and group_subscribers(redis_db, job.pk) == 1)
        pushed = {"type": "STEP_STARTED", "job_id": str(job.pk), "seq": 1, "pushed": True}
        await layer.group_send(f"job.{job.pk}", {"type": "job.events", "events": [pushed]})
        message = await socket.receive_json_from(timeout=5)
        await socket.disconnect()
        return message

    def pubsub_connections():
        return {client["id"] for client in redis_db.client_list(_type="pubsub")}

    async def wait_for(condition):
        await in_thread(wait_until, condition, timeout=15, message="the layer's pub/sub connection")

    assert async_to_sync(scenario)()["pushed"] is True


# --- scripts/watch_job.py ---------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_the_watch_script_honours_its_timeout_while_connected_to_a_silent_job(registry, asgi_server):
    import asyncio
    import time

    from scripts.watch_job import watch

    job = new_job(registry)  # no worker runs: the job says nothing after WS_CONNECTED
    lines = []
    started = time.monotonic()

    status = asyncio.run(watch(f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}", out=lines.append, timeout=1.5))

    assert status == 2 and lines[-1] == "timed out"
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_the_watch_script_pings_a_silent_socket_and_learns_of_a_lost_final_event(registry, asgi_server, settings):
    import asyncio

    from jobs.models import Job, JobEvent
    from scripts.watch_job import watch

    settings.CAO_WS_RESYNC_S = 0  # only the client's ping can recover it
    job = new_job(registry)
    lines = []

    def complete_without_push():
        # The final event is committed, and its push is lost
        Job.objects.filter(pk=job.pk).update(last_event_seq=1, status="COMPLETED")
        final = {"type": "JOB_COMPLETED", "job_id": str(job.pk), "seq": 1, "message": "done", "total_steps": 4}
        JobEvent.objects.create(job_id=job.pk, seq=1, type="JOB_COMPLETED", payload=final, created_at=job.created_at)

    async def scenario():
        url = f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}"
        watching = asyncio.create_task(watch(url, out=lines.append, timeout=20, ping_after_s=0.3))
        async def connected():
            while not lines:
                await asyncio.sleep(0.02)

        await asyncio.wait_for(connected(), timeout=20)  # the socket's first line, with a deadline
        await in_thread(complete_without_push)
        return await watching

    assert asyncio.run(scenario()) == 0
    assert lines[0].startswith("connected") and "JOB_COMPLETED" in lines[-1]
