"""The engine end to end: real PostgreSQL, Redis broker, Dramatiq worker threads
and the simulator over HTTP."""

import time
import uuid

import dramatiq
import pytest

from jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, StepAttempt
from orchestration.per_process import get_limiter
from orchestration.messages import step_message
from services_registry.models import RecipeStep, Service
from tests.gate import GatedService
from tests.job_api import post_job as submit

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_kind(request):
    """The engine's integration tests run on both brokers (leases stay on Redis)."""
    return request.param


def wait_status(wait, job_id, *statuses, timeout=30):
    return wait(
        lambda: (job := Job.objects.get(pk=job_id)).status in statuses and job,
        timeout=timeout,
        message=f"job {job_id} to reach {statuses}",
    )


def event_types(job_id):
    return list(JobEvent.objects.filter(job_id=job_id).order_by("seq").values_list("type", flat=True))


def set_service(name, **fields):
    Service.objects.filter(name=name).update(**fields)


def test_business_plan_runs_every_step_and_keeps_every_output(api, registry, simulator, worker, wait):
    job_id = submit(api)

    job = wait_status(wait, job_id, JobStatus.COMPLETED)

    steps = ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"]
    assert job.context["initial_input"] == {"business_name": "Acme Labs"}
    for index, service in enumerate(steps):
        output = job.context[f"step_{index}_{service}"]
        assert output["status"] == "SUCCESS"
        assert isinstance(output["data"], dict) and output["data"]
        assert output["metrics"]["execution_time_ms"] >= 0
        assert output["timestamp"]
    assert event_types(job_id) == [
        *[kind for _ in steps for kind in ("STEP_STARTED", "STEP_COMPLETED")],
        "JOB_COMPLETED",
    ]
    seqs = list(JobEvent.objects.filter(job_id=job_id).order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, len(seqs) + 1))
    assert job.finished_at is not None and job.step_state == "IDLE"
    assert StepAttempt.objects.filter(job_id=job_id, outcome=AttemptOutcome.SUCCEEDED).count() == 4


def test_viral_video_completes(api, registry, simulator, worker, wait):
    job_id = submit(api, "viral_video")

    job = wait_status(wait, job_id, JobStatus.COMPLETED)

    assert set(job.context) == {
        "initial_input", "step_0_prompt_enhancer", "step_1_video_gen_v2", "step_2_email_notifier",
    }


def test_downstream_receives_the_exact_envelope_and_headers(api, registry, simulator, worker, wait, settings):
    settings.INTERNAL_API_KEY = "internal-secret"
    set_service("fast_chat_llm", auth_type="bearer")
    set_service("summarizer_pro", auth_type="api_key_header", auth_header_name="X-Service-Key")
    job_id = submit(api, input_data={"business_name": "Acme", "tone": "bold"})
    wait_status(wait, job_id, JobStatus.COMPLETED)

    [first] = simulator.requests("prompt_enhancer")
    assert first["method"] == "POST" and first["path"] == "/prompt_enhancer/v1/execute"
    meta = first["json"]["meta"]
    assert meta["job_id"] == job_id and meta["step_index"] == 0
    assert meta["service_name"] == "prompt_enhancer" and meta["attempt"] == 1 and meta["timestamp"]
    assert first["json"]["payload"] == {
        "params": {"business_name": "Acme", "tone": "bold"},
        "context": {"initial_input": {"business_name": "Acme", "tone": "bold"}},
    }
    headers = {name.lower(): value for name, value in first["headers"].items()}
    assert headers["idempotency-key"] == f"{job_id}:0:prompt_enhancer"
    assert "authorization" not in headers  # auth type none: the key is not sent

    [second] = simulator.requests("fast_chat_llm")
    headers = {name.lower(): value for name, value in second["headers"].items()}
    assert headers["authorization"] == "Bearer internal-secret"
    assert set(second["json"]["payload"]["context"]) == {"initial_input", "step_0_prompt_enhancer"}

    [third] = simulator.requests("summarizer_pro")
    headers = {name.lower(): value for name, value in third["headers"].items()}
    assert headers["x-service-key"] == "internal-secret"


def test_503_twice_then_success_completes_with_three_attempts(api, registry, simulator, worker, wait, fast_retries):
    simulator.configure(fail={"summarizer_pro": "503x2"})
    job_id = submit(api)

    wait_status(wait, job_id, JobStatus.COMPLETED)

    attempts = StepAttempt.objects.filter(job_id=job_id, service="summarizer_pro").order_by("attempt")
    assert [(a.attempt, a.outcome, a.http_status) for a in attempts] == [
        (1, "FAILED", 503), (2, "FAILED", 503), (3, "SUCCEEDED", 200),
    ]
    assert attempts[0].error_code == "RESOURCE_EXHAUSTED"
    assert event_types(job_id).count("STEP_RETRYING") == 2
    retry = JobEvent.objects.filter(job_id=job_id, type="STEP_RETRYING").first().payload
    assert retry["step_name"] == "summarizer_pro" and retry["error_code"] == "RESOURCE_EXHAUSTED"


def test_a_400_fails_the_job_at_once_and_not_retryable(api, registry, simulator, worker, wait, fast_retries):
    simulator.configure(fail={"fast_chat_llm": "400"})
    job_id = submit(api)

    job = wait_status(wait, job_id, JobStatus.FAILED)

    assert (job.error_code, job.retryable, job.current_step_index) == ("DOWNSTREAM_REJECTED", False, 1)
    assert StepAttempt.objects.filter(job_id=job_id, service="fast_chat_llm").count() == 1
    error = JobEvent.objects.get(job_id=job_id, type="JOB_ERROR").payload
    assert error["error_code"] == "DOWNSTREAM_REJECTED" and error["action"] == "CONTACT_SUPPORT"
    assert error["step_name"] == "fast_chat_llm"


def test_exhausted_retries_fail_retryable_then_resume_completes(
    api, registry, simulator, worker, wait, fast_retries
):
    set_service("summarizer_pro", max_attempts=2)
    simulator.configure(fail={"summarizer_pro": "503"})
    job_id = submit(api)

    job = wait_status(wait, job_id, JobStatus.FAILED)
    assert (job.error_code, job.retryable, job.current_step_index) == ("RESOURCE_EXHAUSTED", True, 2)
    assert JobEvent.objects.get(job_id=job_id, type="JOB_ERROR").payload["action"] == "RETRY_AVAILABLE"

    simulator.configure(fail={"summarizer_pro": None})
    response = api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json")
    assert response.json()["resuming_from_step"] == 2

    job = wait_status(wait, job_id, JobStatus.COMPLETED)
    summarizer = StepAttempt.objects.filter(job_id=job_id, service="summarizer_pro").order_by("started_at")
    # Two attempts before the resume, then a fresh budget starting again at 1.
    assert [(a.attempt, a.outcome) for a in summarizer] == [(1, "FAILED"), (2, "FAILED"), (1, "SUCCEEDED")]
    assert "JOB_RESUMED" in event_types(job_id)
    assert job.error_code == "" and job.retryable is False


class ProcessedMessages(dramatiq.Middleware):
    """Ids of the messages the worker has finished handling (the actor returned)."""

    def __init__(self):
        self.ids = set()

    def after_process_message(self, broker, message, *, result=None, exception=None):
        self.ids.add(message.message_id)

    after_skip_message = after_process_message


@pytest.fixture
def processed(worker):
    broker = dramatiq.get_broker()
    middleware = ProcessedMessages()
    broker.add_middleware(middleware)
    yield middleware
    broker.middleware.remove(middleware)


@pytest.fixture
def gate(worker, settings):
    """prompt_enhancer's calls held until the test opens the gate (closed before the worker stops)."""
    with GatedService() as service:
        settings.CAO_SERVICE_URL_OVERRIDES = {**settings.CAO_SERVICE_URL_OVERRIDES, "prompt_enhancer": service.base_url}
        yield service


def test_a_duplicated_step_message_calls_the_downstream_once_and_keeps_the_running_lease(
    api, registry, simulator, worker, gate, processed, wait
):
    from orchestration.messages import lease_member
    from orchestration.per_process import get_limiter

    # Given the first step's call in flight, holding its lease (no renewal within the test)
    set_service("prompt_enhancer", queue="default", lease_ttl_s=600)
    job_id = submit(api)
    gate.wait_in_flight(1)
    lease = lease_member(job_id, 0, 1)
    assert get_limiter().locate("prompt_enhancer", lease) == "holder"

    # When the broker redelivers (or maintenance re-sends) the very same message, and it is handled
    duplicate = dramatiq.get_broker().enqueue(
        step_message(queue="default", job_id=job_id, step_index=0, token=1, service="prompt_enhancer")
    )
    wait(lambda: duplicate.message_id in processed.ids, message="the duplicate to be handled")

    # Then the running call still holds its lease: the duplicate neither called nor released anything
    assert gate.in_flight == 1
    assert get_limiter().locate("prompt_enhancer", lease) == "holder"
    gate.open()
    wait_status(wait, job_id, JobStatus.COMPLETED)
    assert gate.calls == [f"{job_id}:0:prompt_enhancer"]


def test_messages_for_cancelled_or_completed_jobs_do_nothing(api, registry, simulator, worker, wait):
    done = submit(api)
    wait_status(wait, done, JobStatus.COMPLETED)
    cancelled = submit(api)
    api.post(f"/api/v1/jobs/{cancelled}/cancel")
    simulator.reset()
    broker = dramatiq.get_broker()

    for job_id, token in ((done, 1), (done, 5), (cancelled, 1), (str(uuid.uuid4()), 1)):
        broker.enqueue(step_message(queue="default", job_id=job_id, step_index=0, token=token, service="prompt_enhancer"))
    broker.join("default", timeout=10_000)
    worker.join()

    assert sum(stats["calls"] for stats in simulator.stats().values()) == 0
    # ... and the slots those messages took before finding out are free again
    assert get_limiter().occupancy("prompt_enhancer").in_use == 0
    assert Job.objects.get(pk=done).status == JobStatus.COMPLETED
    assert Job.objects.get(pk=cancelled).status == JobStatus.CANCELLED


def test_editing_a_recipe_does_not_change_a_job_already_created(api, registry, simulator, worker, wait):
    simulator.configure(latency={"prompt_enhancer": "200ms"})
    job_id = submit(api)
    RecipeStep.objects.filter(recipe__name="business_plan", service__name="summarizer_pro").delete()

    job = wait_status(wait, job_id, JobStatus.COMPLETED)

    assert job.steps == ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"]
    assert "step_2_summarizer_pro" in job.context
    later = Job.objects.get(pk=submit(api))
    assert later.steps == ["prompt_enhancer", "fast_chat_llm", "email_notifier"]


def test_cancel_during_a_call_records_it_and_starts_nothing_more(api, registry, simulator, worker, gate, wait):
    # Given prompt_enhancer's call held in flight (at the gate, however slow the machine)
    job_id = submit(api)
    gate.wait_in_flight(1)

    # When the job is cancelled while it runs, and the call then answers
    response = api.post(f"/api/v1/jobs/{job_id}/cancel")
    assert response.json()["previous_status"] == "RUNNING"
    gate.open()

    # Then the call is recorded, and nothing more starts
    wait(
        lambda: StepAttempt.objects.filter(job_id=job_id, service="prompt_enhancer", outcome="SUCCEEDED").exists(),
        message="the running call to be recorded",
    )
    job = Job.objects.get(pk=job_id)
    assert job.status == JobStatus.CANCELLED and job.step_state == "IDLE"
    assert "step_0_prompt_enhancer" in job.context
    assert simulator.stats()["fast_chat_llm"]["calls"] == 0
    assert event_types(job_id)[-2:] == ["JOB_CANCELLED", "STEP_COMPLETED"]


def test_a_full_service_parks_steps_and_never_exceeds_its_limit(api, registry, simulator, worker, wait):
    set_service("fast_chat_llm", concurrency_limit=1)
    simulator.configure(latency={"fast_chat_llm": "150ms"})

    job_ids = [submit(api) for _ in range(4)]
    for job_id in job_ids:
        wait_status(wait, job_id, JobStatus.COMPLETED)

    assert simulator.stats()["fast_chat_llm"]["max_in_flight"] == 1
    parked = JobEvent.objects.filter(job_id__in=job_ids, type="WAITING_FOR_SLOT")
    assert parked.count() >= 1
    assert {event.payload["step_name"] for event in parked} == {"fast_chat_llm"}


def test_the_limit_holds_while_redis_comes_back_empty_during_a_call(api, registry, simulator, worker, wait):
    from common.redis import get_redis

    set_service("fast_chat_llm", concurrency_limit=1, lease_ttl_s=60)  # no renewal within the test
    simulator.configure(latency={"fast_chat_llm": "1500ms"})
    first = submit(api)
    wait(lambda: simulator.stats()["fast_chat_llm"]["in_flight"] == 1, message="the first call to be in flight")

    get_redis().flushdb()  # Redis restarted without persistence: every lease is gone
    second = submit(api)

    for job_id in (first, second):
        wait_status(wait, job_id, JobStatus.COMPLETED)
    assert simulator.stats()["fast_chat_llm"]["max_in_flight"] == 1
    assert "WAITING_FOR_SLOT" in event_types(second)


def test_a_disabled_service_fails_the_job_retryable(api, registry, simulator, worker, wait):
    simulator.configure(latency={"prompt_enhancer": "300ms"})
    job_id = submit(api)
    set_service("fast_chat_llm", enabled=False)

    job = wait_status(wait, job_id, JobStatus.FAILED)

    assert (job.error_code, job.retryable, job.current_step_index) == ("SERVICE_UNAVAILABLE", True, 1)
    set_service("fast_chat_llm", enabled=True)
    api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json")
    wait_status(wait, job_id, JobStatus.COMPLETED)


def test_a_database_outage_while_recording_loses_no_output(api, registry, simulator, worker, gate, wait):
    # Given a call held in flight
    job_id = submit(api)
    gate.wait_in_flight(1)

    # When PostgreSQL drops every other connection (the worker's among them), then the call answers
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cursor.rowcount >= 1  # the outage really hit someone
    gate.open()

    # Then the worker records the result on a fresh connection and the job completes
    job = wait_status(wait, job_id, JobStatus.COMPLETED)
    assert job.context["step_0_prompt_enhancer"]["status"] == "SUCCESS"
    assert gate.calls == [f"{job_id}:0:prompt_enhancer"]  # called once: the output was kept, not re-fetched


def test_events_are_stamped_once_the_write_has_its_database_connection(api, registry, simulator, worker, wait, monkeypatch):
    # A green worker's write may wait for one of the pool's few connections;
    # its events' ts must not count that wait as delivery lag.
    from datetime import datetime

    from common import green

    waited_s, taken = 0.3, []
    take = green.take_database_connection

    def slow_take():
        take()
        time.sleep(waited_s)  # the pool's other users held every connection this long
        taken.append(time.time())

    monkeypatch.setattr(green, "take_database_connection", slow_take)
    job_id = submit(api)
    wait_status(wait, job_id, JobStatus.COMPLETED)

    stamped = [
        datetime.fromisoformat(payload["ts"]).timestamp()
        for payload in JobEvent.objects.filter(job_id=job_id, type__in=["STEP_STARTED", "STEP_COMPLETED"])
        .order_by("seq").values_list("payload", flat=True)
    ]
    assert len(stamped) == 8
    for ts in stamped:
        before = [moment for moment in taken if moment <= ts]
        assert before and ts - max(before) < waited_s, "an event was stamped before its write took its connection"
