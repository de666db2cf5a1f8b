"""Services that answer what the database cannot store, echo secrets, or take their time.

Real PostgreSQL, Redis, Dramatiq worker threads and the simulator over HTTP:
whatever a service answers, the attempt ends as a typed failure, the events
are written and the slot comes back at once.
"""

import pytest
from django.db import connection

from jobs.models import Job, JobStatus, StepAttempt
from orchestration.engine import Engine
from orchestration.http_client import ServiceReply
from orchestration.messages import lease_member
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.test_engine import event_types, set_service, submit, wait_status

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def slots_in_use(service):
    return get_limiter().occupancy(service).in_use


def fail_fast(service, **fields):
    # One attempt, and a lease that would keep a stranded slot for 11 minutes.
    set_service(service, **{"max_attempts": 1, "lease_ttl_s": 660, **fields})


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("nan", "NaN is not a JSON number"),
        ("infinity", "Infinity is not a JSON number"),
        ("nul", "NUL"),
        ("surrogate", "surrogate"),
        ("deep", "nested too deeply"),
        ("oversized", "CAO_MAX_REPLY_BYTES"),
        ("invalid_json", "without a JSON object"),
    ],
)
def test_a_reply_the_database_cannot_store_fails_the_attempt_and_frees_the_slot_at_once(
    api, registry, simulator, worker, wait, kind, reason
):
    # Given summarizer_pro answers 200 with a body PostgreSQL's jsonb would refuse
    fail_fast("summarizer_pro")
    simulator.configure(malformed={"summarizer_pro": kind})

    # When a job reaches it
    job_id = submit(api)

    # Then the job fails (retryable) with MALFORMED_RESPONSE, the events are written...
    job = wait_status(wait, job_id, JobStatus.FAILED)
    assert (job.error_code, job.retryable, job.current_step_index) == ("MALFORMED_RESPONSE", True, 2)
    assert reason in job.error_message
    attempt = StepAttempt.objects.get(job_id=job_id, service="summarizer_pro")
    assert (attempt.outcome, attempt.error_code) == ("FAILED", "MALFORMED_RESPONSE")
    assert event_types(job_id)[-2:] == ["STEP_STARTED", "JOB_ERROR"]
    # ... and the slot is freed just after, not after the 660 s lease
    wait(lambda: slots_in_use("summarizer_pro") == 0, timeout=5, message="the slot to be released")


def test_an_error_inside_the_gateway_during_the_call_is_a_typed_failure(registry, simulator, settings):
    # Given a client that breaks in a way the engine does not foresee
    class BrokenClient:
        def execute(self, service, *, envelope, idempotency_key, timeout_s=None):
            raise RecursionError("maximum recursion depth exceeded")

    job = _queued_job(registry)
    engine = Engine(client=BrokenClient())

    # When the step runs
    claim = engine.run_step(job.id, 0, job.step_token)

    # Then the attempt ends as GATEWAY_ERROR and the slot is released
    job.refresh_from_db()
    attempt = StepAttempt.objects.get(job=job, token=claim.step.token)
    assert (attempt.outcome, attempt.error_code) == ("FAILED", "GATEWAY_ERROR")
    assert "RecursionError" in attempt.error_message
    assert job.step_state == "QUEUED" and job.step_token == claim.step.token + 1  # a retry is on its way
    assert get_limiter().locate("prompt_enhancer", claim.member) is None


def test_a_reply_postgresql_refuses_while_recording_becomes_a_failure_not_a_stranded_step(registry, simulator):
    # Given a reply the parser would never let through: built by hand, so the
    # database itself refuses it (NaN is not valid jsonb)
    class UnstorableClient:
        def execute(self, service, *, envelope, idempotency_key, timeout_s=None):
            return ServiceReply(data={"x": float("nan")}, metrics={}, status_code=200)

    job = _queued_job(registry)
    engine = Engine(client=UnstorableClient())

    # When the step runs
    claim = engine.run_step(job.id, 0, job.step_token)

    # Then the failure is recorded in place of the output, and the slot is free
    attempt = StepAttempt.objects.get(job=job, token=claim.step.token)
    assert (attempt.outcome, attempt.error_code) == ("FAILED", "MALFORMED_RESPONSE")
    assert "could not be stored" in attempt.error_message
    assert "step_0_prompt_enhancer" not in Job.objects.get(pk=job.pk).context
    assert get_limiter().locate("prompt_enhancer", claim.member) is None


def _queued_job(registry):
    from orchestration.commands import submit_job

    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    return Job.objects.get(pk=job.pk)


# --- Secrets a service echoes back -----------------------------------------------------------

SECRET = "internal-" + "k" * 80  # longer than any cut a kept string gets


@pytest.mark.parametrize("kind", ["echo_secret", "echo_secret_failed", "echo_secret_data"])
def test_internal_api_key_echoed_by_a_service_is_never_stored_nor_shown(
    api, registry, simulator, worker, wait, settings, kind
):
    # Given summarizer_pro receives INTERNAL_API_KEY and repeats it in its reply
    settings.INTERNAL_API_KEY = SECRET
    fail_fast("summarizer_pro", auth_type="api_key_header")
    simulator.configure(malformed={"summarizer_pro": kind})

    # When a job reaches it
    job_id = submit(api)
    wait_status(wait, job_id, JobStatus.FAILED, JobStatus.COMPLETED)

    # Then not even a prefix of the key is in any row, nor in what the owner is shown
    sent = {name.lower(): value for name, value in simulator.requests("summarizer_pro")[0]["headers"].items()}
    assert sent["x-api-key"] == SECRET  # it was sent
    prefix = SECRET[:24]
    with connection.cursor() as cursor:
        for table in ("jobs_job", "jobs_stepattempt", "jobs_jobevent"):
            cursor.execute(f"SELECT count(*) FROM {table} WHERE {table}::text LIKE %s", [f"%{prefix}%"])
            assert cursor.fetchone()[0] == 0, table
    shown = api.get(f"/api/v1/jobs/{job_id}").content.decode() + api.get(f"/api/v1/jobs/{job_id}/events").content.decode()
    assert prefix not in shown and "***" in shown


# --- Timeouts -----------------------------------------------------------------------------


def test_a_services_own_timeout_applies_even_above_the_default_read_timeout(
    api, registry, simulator, worker, wait, settings
):
    # Given a slow service with a generous timeout of its own, above HTTP_READ_TIMEOUT_S
    settings.HTTP_READ_TIMEOUT_S = 0.5
    set_service("summarizer_pro", timeout_s=5, lease_ttl_s=10)
    simulator.configure(latency={"summarizer_pro": "1200ms"})

    job_id = submit(api)

    # Then the call is allowed its own timeout and the job completes first time
    wait_status(wait, job_id, JobStatus.COMPLETED)
    assert StepAttempt.objects.filter(job_id=job_id, service="summarizer_pro").count() == 1


def test_the_default_read_timeout_applies_to_a_service_without_its_own(api, registry, simulator, worker, wait, settings):
    settings.HTTP_READ_TIMEOUT_S = 0.5
    fail_fast("summarizer_pro", timeout_s=None)
    simulator.configure(latency={"summarizer_pro": "3s"})

    job = wait_status(wait, submit(api), JobStatus.FAILED)

    assert job.error_code == "DOWNSTREAM_TIMEOUT" and "0.5 s" in job.error_message


def test_after_a_timeout_the_slot_stays_held_for_one_more_timeout_period(api, registry, simulator, worker, wait):
    # Given a service that hangs past its 1 s timeout (it may still be working)
    fail_fast("summarizer_pro", timeout_s=1, lease_ttl_s=30)
    simulator.configure(hang={"summarizer_pro": "20s"})

    job = wait_status(wait, submit(api), JobStatus.FAILED)
    assert job.error_code == "DOWNSTREAM_TIMEOUT"

    # Then the timed-out call keeps its slot (not released, not 30 s either);
    # the engine shortens the hold just after it records the failure...
    attempt = StepAttempt.objects.get(job=job, service="summarizer_pro")
    member = lease_member(job.pk, 2, attempt.token)

    def held_for_one_timeout():
        held = get_limiter().occupancy("summarizer_pro")
        left = [(holder.member, holder.expires_at - held.now) for holder in held.holders]
        return len(left) == 1 and left[0][0] == member and left[0][1] <= 1.0

    wait(held_for_one_timeout, timeout=5, message="the slot to be held for one timeout period")
    # ... and it frees itself after about one timeout
    wait(lambda: slots_in_use("summarizer_pro") == 0, timeout=5, message="the held slot to expire")


def test_a_video_call_is_not_cut_short_by_a_message_time_limit_sized_for_short_calls(registry, settings):
    import dramatiq
    from dramatiq import Message

    from jobs.outcomes import StepDispatch
    from orchestration.dispatch import send_step

    settings.HTTP_READ_TIMEOUT_S = 30
    Service.objects.filter(name="video_gen_v2").update(timeout_s=600, lease_ttl_s=660)

    send_step(StepDispatch("00000000-0000-0000-0000-000000000001", 1, 1, "video_gen_v2"))

    broker = dramatiq.get_broker()
    [raw] = broker.client.hvals(f"{broker.namespace}:heavy.msgs")
    message = Message.decode(raw)
    assert message.options["time_limit"] >= (600 + settings.CAO_RECORD_RETRY_S) * 1000


def test_the_admin_and_api_show_the_timeout_in_force(api, registry, settings):
    settings.HTTP_READ_TIMEOUT_S = 42
    Service.objects.filter(name="email_notifier").update(timeout_s=None)

    services = {service["name"]: service for service in api.get("/api/v1/services").json()}

    assert services["email_notifier"]["timeout_s"] == 42
    assert services["video_gen_v2"]["timeout_s"] == 600


def test_a_lease_ttl_below_the_default_timeout_is_refused_when_the_service_has_none(registry, settings):
    from django.core.exceptions import ValidationError

    settings.HTTP_READ_TIMEOUT_S = 30
    service = Service.objects.get(name="email_notifier")
    service.timeout_s, service.lease_ttl_s = None, 20

    with pytest.raises(ValidationError) as error:
        service.full_clean()

    assert "HTTP_READ_TIMEOUT_S (30s)" in str(error.value)
