"""The WebSocket over a real ASGI server (uvicorn) and a real client (websockets)."""

import asyncio
import json
import random

import pytest
from websockets.asyncio.client import connect

from django.db import connection

from jobs.models import Job, JobStatus, StepState
from jobs.monitor import monitor_token
from orchestration.commands import submit_job
from services_registry.models import Service
from tests.gate import GatedService

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


async def read_events(url, *, until=None, budget_s=None):
    """Connect, then collect events until one of type ``until`` or ``budget_s`` elapsed."""
    events = []
    async with connect(url, open_timeout=10) as socket:
        hello = json.loads(await socket.recv())
        assert hello["type"] == "WS_CONNECTED"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (budget_s or 30)
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return hello, events
            try:
                message = json.loads(await asyncio.wait_for(socket.recv(), left))
            except asyncio.TimeoutError:
                return hello, events
            events.append(message)
            if until and message["type"] == until:
                return hello, events


def is_completed(job_id):
    try:
        return Job.objects.get(pk=job_id).status == JobStatus.COMPLETED
    finally:
        connection.close()  # this runs in a throwaway executor thread


@pytest.fixture
def gate(worker, settings):
    """prompt_enhancer's calls held until the test opens the gate (closed before the worker stops)."""
    with GatedService() as service:
        settings.CAO_SERVICE_URL_OVERRIDES = {**settings.CAO_SERVICE_URL_OVERRIDES, "prompt_enhancer": service.base_url}
        yield service


def test_connecting_repeatedly_while_a_job_emits_events_never_skips_or_repeats(
    registry, simulator, worker, asgi_server, gate, wait
):
    # Given three jobs queued on a busy single-slot service: one call held in flight, two steps parked
    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    simulator.configure(latency={"*": "80ms"})
    jobs = [submit_job(feature_name="business_plan", input_data={"n": i})[0] for i in range(3)]
    gate.wait_in_flight(1)
    wait(
        lambda: Job.objects.filter(pk__in=[j.pk for j in jobs], step_state=StepState.WAITING).count() == 2,
        message="two steps parked for the slot",
    )
    job = jobs[0]
    quiet_seq = Job.objects.get(pk=job.pk).last_event_seq  # nothing can happen until the gate opens
    assert quiet_seq >= 1
    url = f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}"
    rng = random.Random(47)  # fixed seed: the same connection lengths every run

    async def hammer():
        """Connect over and over while the jobs run, for a random while each time."""
        rounds = []
        while not await asyncio.to_thread(is_completed, job.pk):
            rounds.append(await read_events(url, budget_s=rng.uniform(0.01, 0.15)))
        rounds.append(await read_events(url, until="JOB_COMPLETED"))
        return rounds

    async def scenario():
        # A witness connects while the job is quiet, and reads the log up to that point...
        async with connect(url, open_timeout=10) as witness:
            assert json.loads(await witness.recv())["type"] == "WS_CONNECTED"
            seen = [json.loads(await asyncio.wait_for(witness.recv(), 10)) for _ in range(quiet_seq)]
            # ...then the slot frees and the jobs run while the hammer reconnects
            gate.open()
            rounds = asyncio.create_task(hammer())
            while seen[-1]["type"] != "JOB_COMPLETED":
                seen.append(json.loads(await asyncio.wait_for(witness.recv(), 30)))
            return seen, await rounds

    witnessed, rounds = asyncio.run(scenario())

    # Then the witness got every later event live, once each, in order (the log was read before they existed)
    assert [event["seq"] for event in witnessed] == list(range(1, len(witnessed) + 1))
    assert len(witnessed) > quiet_seq + 1
    # And every reconnecting client saw a gapless prefix 1..k of the log, in order, no duplicates
    for hello, events in rounds:
        seqs = [event["seq"] for event in events]
        assert seqs == list(range(1, len(seqs) + 1)), seqs
    final_hello, final_events = rounds[-1]
    assert final_events == witnessed
    assert len(rounds) > 3


def test_reconnecting_with_after_resumes_exactly_where_the_client_left(registry, simulator, worker, asgi_server, wait):
    simulator.configure(latency={"fast_chat_llm": "300ms"})
    job, _ = submit_job(feature_name="business_plan", input_data={})
    url = f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}"

    async def scenario():
        _, first = await read_events(url, until="STEP_STARTED")
        _, first_more = await read_events(url + f"&after={first[-1]['seq']}", until="STEP_COMPLETED")
        last = first_more[-1]["seq"]
        _, rest = await read_events(url + f"&after={last}", until="JOB_COMPLETED")
        return first, first_more, rest

    first, middle, rest = asyncio.run(scenario())

    seqs = [e["seq"] for e in first + middle + rest]
    assert seqs == list(range(1, len(seqs) + 1))
    assert rest[-1]["type"] == "JOB_COMPLETED"


def test_closing_codes_reach_a_real_client(registry, asgi_server):
    from websockets.exceptions import ConnectionClosed

    job, _ = submit_job(feature_name="business_plan", input_data={})

    async def close_code(url):
        async with connect(url) as socket:
            try:
                await socket.recv()
            except ConnectionClosed as closed:
                return closed.rcvd.code

    assert asyncio.run(close_code(f"{asgi_server.ws_url}/ws/{job.pk}?token=nope")) == 4401


def test_the_watch_script_prints_a_job_to_completion(registry, simulator, worker, asgi_server):
    from scripts.watch_job import watch

    job, _ = submit_job(feature_name="viral_video", input_data={})
    lines = []

    status = asyncio.run(watch(f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}", out=lines.append, timeout=30))

    assert status == 0
    assert lines[0].startswith(f"connected: job {job.pk}")
    assert "JOB_COMPLETED" in lines[-1]
    assert sum("STEP_COMPLETED" in line for line in lines) == 3


def test_the_watch_script_reports_a_refusal(registry, asgi_server):
    from scripts.watch_job import watch

    job, _ = submit_job(feature_name="viral_video", input_data={})
    lines = []

    assert asyncio.run(watch(f"{asgi_server.ws_url}/ws/{job.pk}?token=forged", out=lines.append)) == 2
    assert "4401" in lines[-1]


async def first_frame(url):
    """``("open", first message type)``, or ``("closed", code)`` when the server refuses."""
    from websockets.exceptions import ConnectionClosed

    async with connect(url, open_timeout=10) as socket:
        try:
            return "open", json.loads(await asyncio.wait_for(socket.recv(), 10))["type"]
        except ConnectionClosed as closed:
            return "closed", closed.rcvd.code


def test_a_monitor_token_stops_working_when_its_key_is_deactivated_or_deleted(registry, asgi_server):
    import requests

    from api_keys.models import ApiKey

    # Given two keys, each with a job and the monitor_url it was given
    urls = {}
    for name in ("deactivated", "deleted"):
        api_key, raw_key = ApiKey.objects.create_key(name=name)
        response = requests.post(
            f"{asgi_server.base_url}/api/v1/jobs", json={"feature_name": "business_plan", "input_data": {}},
            headers={"X-API-Key": raw_key}, timeout=10,
        )
        urls[name] = (api_key, response.json()["monitor_url"])
    assert asyncio.run(first_frame(urls["deactivated"][1])) == ("open", "WS_CONNECTED")

    # When one key is deactivated and the other deleted in the admin
    ApiKey.objects.filter(pk=urls["deactivated"][0].pk).update(is_active=False)
    urls["deleted"][0].delete()

    # Then neither monitor_url opens the socket any more
    assert asyncio.run(first_frame(urls["deactivated"][1])) == ("closed", 4401)
    assert asyncio.run(first_frame(urls["deleted"][1])) == ("closed", 4401)


def test_a_token_that_names_no_key_needs_the_jobs_owner_active(registry, asgi_server):
    from api_keys.models import ApiKey

    owner, _ = ApiKey.objects.create_key(name="client")
    job, _ = submit_job(feature_name="business_plan", input_data={}, owner=owner)
    url = f"{asgi_server.ws_url}/ws/{job.pk}?token={monitor_token(job.pk)}"  # as tokens were issued before
    assert asyncio.run(first_frame(url)) == ("open", "WS_CONNECTED")

    ApiKey.objects.filter(pk=owner.pk).update(is_active=False)

    assert asyncio.run(first_frame(url)) == ("closed", 4401)
