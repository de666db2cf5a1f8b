"""Job deadlines: no call starts after one, a call in flight is cut off at it, and nothing waits past it.

Real PostgreSQL, Redis, Dramatiq worker threads and the simulator over HTTP.
"""

import json
import os
import subprocess
from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, StepAttempt, StepState
from orchestration.commands import submit_job
from orchestration.engine import Engine
from orchestration.maintenance import run_maintenance
from orchestration.messages import step_member
from orchestration.per_process import get_limiter
from jobs.state import current_step
from services_registry.models import Service

pytestmark = pytest.mark.django_db(transaction=True)

FEATURE = "business_plan"  # prompt_enhancer, fast_chat_llm, summarizer_pro, email_notifier


def create(api, **fields):
    return api.post("/api/v1/jobs", {"feature_name": FEATURE, "input_data": {"n": 1}, **fields}, format="json")


def wait_failed(wait, job_id, timeout=20):
    return wait(
        lambda: (job := Job.objects.get(pk=job_id)).status == JobStatus.FAILED and job,
        timeout=timeout, message=f"job {job_id} to fail",
    )


def in_the_past(job, seconds=1):
    Job.objects.filter(pk=job.pk).update(deadline_at=timezone.now() - timedelta(seconds=seconds))


# --- The API ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"deadline_s": 0}, "deadline_s"),
        ({"deadline_s": -5}, "deadline_s"),
        ({"deadline_s": 10**9}, "deadline_s"),  # absurd: beyond CAO_MAX_DEADLINE_S
        ({"deadline_s": True}, "deadline_s"),
        ({"deadline_s": "soon"}, "deadline_s"),
        ({"deadline_s": None}, "deadline_s"),
        ({"deadline_at": "2001-01-01T00:00:00Z"}, "deadline_at"),  # past
        ({"deadline_at": "2999-01-01T00:00:00Z"}, "deadline_at"),  # too far
        ({"deadline_at": "tomorrow"}, "deadline_at"),
        ({"deadline_s": 30, "deadline_at": "2999-01-01T00:00:00Z"}, "deadline_at"),  # both
    ],
)
def test_a_bad_deadline_is_a_400_naming_the_field_and_creates_nothing(api, registry, fields, field):
    if field == "deadline_at" and "deadline_s" in fields:
        fields = {**fields, "deadline_at": (timezone.now() + timedelta(minutes=5)).isoformat()}

    response = create(api, **fields)

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["error"]["code"] == "INVALID_INPUT"
    assert field in body["error"]["details"]
    assert not Job.objects.exists()


def test_deadline_s_is_counted_from_the_request_and_shown_on_the_job(api, registry):
    before = timezone.now()
    response = create(api, deadline_s=90)
    after = timezone.now()

    assert response.status_code == 201, response.content
    shown = parse_datetime(api.get(f"/api/v1/jobs/{response.json()['job_id']}").json()["deadline_at"])
    assert before + timedelta(seconds=90) <= shown <= after + timedelta(seconds=90)


def test_deadline_at_is_kept_as_given_and_a_job_without_one_has_none(api, registry):
    deadline = (timezone.now() + timedelta(hours=1)).replace(microsecond=0)

    with_one = create(api, deadline_at=deadline.isoformat()).json()["job_id"]
    without = create(api).json()["job_id"]

    assert parse_datetime(api.get(f"/api/v1/jobs/{with_one}").json()["deadline_at"]) == deadline
    assert api.get(f"/api/v1/jobs/{without}").json()["deadline_at"] is None


def test_the_openapi_schema_documents_both_deadline_fields(api):
    schema = api.get("/api/v1/schema", {"format": "json"}).json()

    create_input = next(
        body for name, body in schema["components"]["schemas"].items() if "deadline_s" in body.get("properties", {})
    )
    assert {"deadline_s", "deadline_at"} <= set(create_input["properties"])
    assert "DEADLINE_EXCEEDED" in create_input["properties"]["deadline_s"]["description"]


# --- The engine ---------------------------------------------------------------------------------


def test_no_call_starts_after_the_deadline_and_the_slot_goes_back(registry, simulator, redis_db):
    job, _ = submit_job(feature_name=FEATURE, input_data={"n": 1}, deadline_at=timezone.now() + timedelta(hours=1))
    in_the_past(job)

    Engine().run_step(job.id, 0, job.step_token, "prompt_enhancer")

    job.refresh_from_db()
    assert (job.status, job.error_code, job.retryable) == (JobStatus.FAILED, "DEADLINE_EXCEEDED", False)
    assert simulator.requests("prompt_enhancer") == []
    assert not StepAttempt.objects.filter(job=job).exists()
    assert get_limiter().occupancy("prompt_enhancer").in_use == 0
    error = JobEvent.objects.get(job=job, type="JOB_ERROR").payload
    assert error["error_code"] == "DEADLINE_EXCEEDED"


def test_a_call_in_flight_is_cut_off_at_the_deadline(api, registry, simulator, worker, wait):
    # fast_chat_llm answers in 5 s and may take 30: the deadline comes first
    Service.objects.filter(name="fast_chat_llm").update(timeout_s=30, lease_ttl_s=60)
    simulator.configure(latency={"fast_chat_llm": "5s"})

    job_id = create(api, deadline_s=1.5).json()["job_id"]

    job = wait_failed(wait, job_id, timeout=15)
    assert (job.error_code, job.retryable) == ("DEADLINE_EXCEEDED", False)
    # The failure is fast_chat_llm's own call, not a later step's claim
    assert job.current_step_index == 1
    [attempt] = StepAttempt.objects.filter(job=job, step_index=1)
    assert attempt.error_code == "DEADLINE_EXCEEDED"
    assert attempt.outcome != AttemptOutcome.SUCCEEDED
    assert "cut off" in attempt.error_message


def test_a_retry_that_would_start_after_the_deadline_fails_the_job_at_once(api, registry, simulator, worker, wait, settings):
    # Every attempt of prompt_enhancer answers 503; the next would be 10-20 s away
    settings.CAO_RETRY_BASE_DELAY_S = 20
    settings.CAO_RETRY_MAX_DELAY_S = 20
    simulator.configure(fail={"prompt_enhancer": "503"})

    job_id = create(api, deadline_s=5).json()["job_id"]

    # Well before the retry would have been due
    job = wait_failed(wait, job_id, timeout=8)
    assert job.error_code == "DEADLINE_EXCEEDED"
    assert "503" in job.error_message or "RESOURCE_EXHAUSTED" in job.error_message
    assert StepAttempt.objects.filter(job=job).count() == 1


def test_a_job_waiting_in_line_past_its_deadline_is_failed_by_maintenance_and_leaves_the_line(registry, redis_db):
    # prompt_enhancer's only slot is taken, so the job parks in its line
    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    limiter = get_limiter()
    assert limiter.acquire("prompt_enhancer", "someone-else", limit=1, ttl_s=60, payload="").granted
    job, _ = submit_job(feature_name=FEATURE, input_data={"n": 1}, deadline_at=timezone.now() + timedelta(hours=1))
    Engine().run_step(job.id, 0, job.step_token, "prompt_enhancer")
    job.refresh_from_db()
    assert job.step_state == StepState.WAITING
    member = step_member(current_step(job))
    assert limiter.locate("prompt_enhancer", member) is not None
    in_the_past(job)

    report = run_maintenance()

    job.refresh_from_db()
    assert report.deadline_failed == 1
    assert (job.status, job.error_code) == (JobStatus.FAILED, "DEADLINE_EXCEEDED")
    assert limiter.locate("prompt_enhancer", member) is None
    assert run_maintenance().deadline_failed == 0  # once


def test_a_job_before_its_deadline_is_left_alone_by_maintenance(registry, redis_db):
    job, _ = submit_job(feature_name=FEATURE, input_data={"n": 1}, deadline_at=timezone.now() + timedelta(hours=1))

    assert run_maintenance().deadline_failed == 0
    job.refresh_from_db()
    assert job.status == JobStatus.PENDING


def test_a_deadline_failure_is_resumed_only_by_force_which_lifts_the_deadline(
    api, staff_api, registry, simulator, worker, wait
):
    job, _ = submit_job(
        feature_name=FEATURE, input_data={"n": 1}, owner=api.api_key, deadline_at=timezone.now() + timedelta(hours=1)
    )
    in_the_past(job)
    wait_failed(wait, job.id)

    refused = api.post(f"/api/v1/jobs/{job.id}/resume", {}, format="json")
    assert refused.status_code == 409, refused.content

    forced = staff_api.post(f"/api/v1/jobs/{job.id}/resume", {"force": True}, format="json")
    assert forced.status_code == 200, forced.content
    done = wait(
        lambda: (current := Job.objects.get(pk=job.id)).status == JobStatus.COMPLETED and current,
        timeout=30, message="the resumed job to complete",
    )
    assert done.deadline_at is None
    assert JobEvent.objects.get(job=job, type="JOB_RESUMED").payload["deadline_lifted"] is True


# --- The real stack: green workers in their own processes ---------------------------------------


@pytest.mark.slow
@pytest.mark.e2e
def test_green_workers_cut_a_call_off_at_the_deadline(testbed):
    with testbed() as bed:
        assert bed.worker_mode == "green"
        bed.set_service("fast_chat_llm", timeout_s=30, lease_ttl_s=60)
        bed.simulator.configure(latency={"fast_chat_llm": "10s"})
        response = bed.session.post(
            f"{bed.base_url}/api/v1/jobs",
            json={"feature_name": FEATURE, "input_data": {"n": 1}, "deadline_s": 2},
            headers={"X-API-Key": bed.api_key}, timeout=30,
        )
        assert response.status_code == 201, response.text
        job_id = response.json()["job_id"]

        bed.wait_finished([job_id], timeout=20, statuses=("FAILED",))

        [(code, index)] = bed.sql("SELECT error_code, current_step_index FROM jobs_job WHERE id = %s", [job_id])
        assert (code, index) == ("DEADLINE_EXCEEDED", 1)  # fast_chat_llm's call was cut off, not run to its end
        assert len(bed.simulator.requests("fast_chat_llm")) == 1


def test_the_readme_deadline_example_works_as_written(registry, asgi_server, client_key):
    from tests.test_sse import readme_blocks

    [command] = readme_blocks("Give it a deadline", "bash")
    done = subprocess.run(
        ["bash", "-c", command.replace("http://127.0.0.1:8000", asgi_server.base_url)],
        env={**os.environ, "CAO_KEY": client_key.raw_key}, capture_output=True, text=True, timeout=60,
    )

    assert done.returncode == 0, done.stderr
    job = Job.objects.get(pk=json.loads(done.stdout)["job_id"])
    assert job.deadline_at is not None
    assert timedelta(seconds=100) < job.deadline_at - job.created_at <= timedelta(seconds=120)
