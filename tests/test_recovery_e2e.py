"""Recovery in seconds and honest outages, with the real stack in separate processes.

Unlike tests/test_resilience.py, these run with the production recovery
settings (maintenance every 60 s, a 30 s re-dispatch grace, Dramatiq's 60 s
broker heartbeat): what they show comes from event-driven recovery (process
heartbeats, a worker's start, Redis's run_id), not from short intervals. The
figures printed feed docs/RELIABILITY.md.
"""

import asyncio
import json
import time

import pytest
import requests
from websockets.asyncio.client import connect

from scripts.testbed import wait_until
from tests.test_resilience import outputs_complete, private_postgres, report  # noqa: F401 (fixture)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PRODUCTION_RECOVERY = {
    "SANITY_CHECK_INTERVAL_SECONDS": "60",
    "CAO_REDISPATCH_GRACE_S": "30",
    "CAO_HANDOFF_TTL_S": "30",
    "CAO_BROKER_HEARTBEAT_TIMEOUT_MS": "60000",
}

# queue -> (a feature whose steps use it, the service on that queue)
QUEUES = {
    "medium": ("business_plan", "fast_chat_llm"),
    "default": ("business_plan", "prompt_enhancer"),
    "heavy": ("viral_video", "video_gen_v2"),
}


def attempts(bed, outcome):
    return bed.sql("SELECT count(*) FROM jobs_stepattempt WHERE outcome = %s", [outcome])[0][0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("queue", list(QUEUES))
def test_a_killed_worker_of_any_queue_is_recovered_in_seconds_not_at_lease_expiry(testbed, queue):
    feature, service = QUEUES[queue]
    with testbed(env=PRODUCTION_RECOVERY) as bed:
        # Given calls of 2 s in flight on that queue's worker, under leases of 5 minutes
        bed.set_service(service, concurrency_limit=4, timeout_s=10, lease_ttl_s=300)
        bed.simulator.configure(latency={service: "2s"})
        jobs = bed.submit_many(6, feature)
        wait_until(lambda: bed.simulator.stats(service)["in_flight"] >= 4, timeout=60, message="calls in flight")

        # When the worker is SIGKILLed and comes back 2 s later (as compose restarts it)
        killed_at = time.monotonic()
        bed.kill(f"worker_{queue}")
        time.sleep(2.0)  # the worker's downtime, part of the scenario
        bed.start(f"worker_{queue}")

        # Then every job completes, long before a lease could have expired
        bed.wait_finished(jobs, timeout=240)
        recovery = time.monotonic() - killed_at
        assert outputs_complete(bed, jobs)
        assert recovery < 60, f"recovered only after {recovery:.0f} s"
        # ... because the dead worker's attempts were recorded LOST and re-run
        lost = attempts(bed, "LOST")
        assert lost >= 4
        stats = bed.simulator.stats(service)
        assert stats["max_in_flight"] <= 4
        assert set(stats["calls_by_key"].values()) <= {1, 2}  # a killed call runs once more, no more
        scheduler = bed.log("scheduler")
        assert "stopped beating" in scheduler or "dead process" in scheduler
        report(
            f"worker_{queue} SIGKILL", jobs=len(jobs), lost_attempts=lost, seconds_kill_to_all_done=round(recovery, 1),
            max_in_flight=stats["max_in_flight"], limit=4, lease_ttl_s=300,
        )


@pytest.mark.timeout(600)
def test_after_a_redis_restart_every_job_finishes_within_seconds(testbed, private_redis):
    with testbed(env=PRODUCTION_RECOVERY) as bed:
        bed.set_service("fast_chat_llm", concurrency_limit=3)
        bed.set_service("summarizer_pro", concurrency_limit=3)
        bed.simulator.configure(latency={"*": "150ms"})
        jobs = bed.submit_many(30)
        wait_until(lambda: bed.statuses(jobs).get("COMPLETED", 0) >= 3, timeout=60, message="some jobs done")

        # When Redis dies and comes back empty 2 s later: messages, leases, lines are gone
        private_redis.stop(kill=True)
        time.sleep(2.0)  # Redis's downtime, part of the scenario
        private_redis.start()
        back_at = time.monotonic()

        # Then the scheduler sees the new run at its next tick and re-sends what was lost at once
        bed.wait_finished(jobs, timeout=240)
        after_back = time.monotonic() - back_at
        assert outputs_complete(bed, jobs)
        assert after_back < 25, f"done {after_back:.0f} s after Redis returned"  # the grace alone is 30 s
        llm, summarizer = bed.simulator.stats("fast_chat_llm"), bed.simulator.stats("summarizer_pro")
        assert llm["max_in_flight"] <= 3 and summarizer["max_in_flight"] <= 3
        assert "Redis restarted or lost its data" in bed.log("scheduler")
        report("Redis restart", jobs=len(jobs), down_s=2, seconds_back_to_all_done=round(after_back, 1))


@pytest.mark.timeout(600)
def test_while_redis_is_down_jobs_are_accepted_and_run_once_it_is_back(testbed, private_redis):
    with testbed(env=PRODUCTION_RECOVERY) as bed:
        # Given Redis is down (PostgreSQL is up)
        private_redis.stop(kill=True)

        # When a client creates a job, then retries the request
        headers = {"X-API-Key": bed.api_key, "Idempotency-Key": "while-redis-is-down"}
        body = {"feature_name": "business_plan", "input_data": {"topic": "outage"}}
        first = requests.post(f"{bed.base_url}/api/v1/jobs", json=body, headers=headers, timeout=30)
        again = requests.post(f"{bed.base_url}/api/v1/jobs", json=body, headers=headers, timeout=30)

        # Then the job is accepted durably, once, and runs when Redis is back
        assert first.status_code == 201, first.text
        assert first.json()["status"] == "PENDING"
        assert again.status_code == 200 and again.json()["job_id"] == first.json()["job_id"]
        private_redis.start()
        seconds = bed.wait_finished([first.json()["job_id"]], timeout=120)
        assert outputs_complete(bed, [first.json()["job_id"]])
        report("POST while Redis is down", answered=first.status_code, seconds_redis_back_to_done=round(seconds, 1))


@pytest.mark.timeout(600)
def test_while_postgresql_is_down_the_api_answers_503_with_retry_after(testbed, private_postgres):  # noqa: F811
    with testbed(database_url=private_postgres.url("cao_e2e")) as bed:
        job = bed.submit()
        private_postgres.stop()
        try:
            headers = {"X-API-Key": bed.api_key}
            for method, path in (
                ("POST", "/api/v1/jobs"),
                ("GET", "/api/v1/jobs"),
                ("GET", f"/api/v1/jobs/{job}"),
                ("GET", "/api/v1/features"),
            ):
                response = requests.request(
                    method, f"{bed.base_url}{path}", headers=headers, timeout=30,
                    json={"feature_name": "business_plan", "input_data": {}} if method == "POST" else None,
                )
                assert response.status_code == 503, (method, path, response.status_code, response.text[:200])
                assert int(response.headers["Retry-After"]) > 0
                assert response.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            ready = requests.get(f"{bed.base_url}/api/v1/health/ready", timeout=30)
            assert ready.status_code == 503
        finally:
            private_postgres.start()
        wait_until(lambda: requests.get(f"{bed.base_url}/api/v1/health/ready", timeout=10).ok, timeout=60, message="ready")
        assert bed.submit()


@pytest.mark.timeout(600)
def test_open_websockets_keep_streaming_across_a_redis_restart(testbed, private_redis):
    with testbed(env=PRODUCTION_RECOVERY) as bed:
        bed.simulator.configure(latency={"*": "400ms"})
        created = [
            requests.post(
                f"{bed.base_url}/api/v1/jobs",
                json={"feature_name": "business_plan", "input_data": {"n": n}},
                headers={"X-API-Key": bed.api_key},
                timeout=30,
            ).json()
            for n in range(8)
        ]

        async def follow(monitor_url, first_event):
            seqs = []
            async with connect(monitor_url, open_timeout=10) as socket:
                while True:
                    message = json.loads(await asyncio.wait_for(socket.recv(), 90))
                    if message["type"] == "WS_CONNECTED":
                        continue
                    seqs.append(message["seq"])
                    first_event.set()
                    if message["type"] == "JOB_COMPLETED":
                        return seqs

        async def scenario():
            events = [asyncio.Event() for _ in created]
            sockets = [asyncio.create_task(follow(job["monitor_url"], seen)) for job, seen in zip(created, events)]
            await asyncio.gather(*(seen.wait() for seen in events))
            # When Redis restarts while every socket is open and its job runs
            await asyncio.to_thread(private_redis.restart, down_for=2.0)
            return await asyncio.gather(*sockets)

        # Then no socket closes, and each receives its job's every event once, in order
        results = asyncio.run(scenario())
        for seqs in results:
            assert seqs == list(range(1, len(seqs) + 1))
        report("WebSockets across a Redis restart", sockets=len(results), events=sum(map(len, results)), closed=0)
