"""Metrics and structured logs: what ops see while the gateway works."""

import io
import json
import logging
import re

import pytest

from common.logs import JobContextFilter, RedactSecretsFilter, log_context
from jobs.models import Job, JobStatus, StepState
from orchestration.commands import submit_job
from tests.gate import GatedService

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client, **extra):
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    return response.content.decode()


MISSING = object()


def sample(text, name, default=MISSING, **labels):
    """The value of one series in Prometheus text.

    A missing series is an AssertionError (a gauge that is not exported is
    not zero), unless a ``default`` is given: a labelled counter has no
    series before its first increment, so a "before" scrape passes 0.0.
    """
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(label_text.rstrip("}").split(","))) if label_text else ""
        if found == wanted:
            return float(value)
    if default is MISSING:
        raise AssertionError(f"no series {name}{{{wanted}}} in the scrape")
    return default


def test_metrics_change_as_a_job_runs(client, registry, simulator, worker, wait):
    before = scrape(client)

    job, _ = submit_job(feature_name="business_plan", input_data={})
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED, message="the job to complete")
    after = scrape(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, 0.0, **labels)

    assert delta("cao_jobs_created_total", feature="business_plan") == 1
    assert delta("cao_jobs_completed_total", feature="business_plan") == 1
    for service in ("prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"):
        assert delta("cao_step_duration_seconds_count", service=service, outcome="success") == 1
    assert sample(after, "cao_slot_limit", service="video_gen_v2") == 2
    assert sample(after, "cao_slots_in_use", service="fast_chat_llm") == 0
    assert sample(after, "cao_slot_waiters", service="fast_chat_llm") == 0
    for queue in ("heavy", "medium", "default"):
        assert sample(after, "cao_queue_depth", queue=queue, kind="ready") == 0
        assert sample(after, "cao_queue_depth", queue=queue, kind="delayed") == 0


@pytest.fixture
def gate(worker, settings):
    """prompt_enhancer's calls held until the test opens the gate (closed before the worker stops)."""
    with GatedService() as service:
        settings.CAO_SERVICE_URL_OVERRIDES = {**settings.CAO_SERVICE_URL_OVERRIDES, "prompt_enhancer": service.base_url}
        yield service


def test_slot_gauges_count_the_calls_held_and_the_steps_parked(client, registry, simulator, worker, gate, wait):
    from services_registry.models import Service

    # Given a single-slot service whose one call is held in flight, and two more steps parked for it
    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    jobs = [submit_job(feature_name="business_plan", input_data={"n": n})[0] for n in range(3)]
    gate.wait_in_flight(1)
    wait(
        lambda: Job.objects.filter(step_state=StepState.WAITING).count() == 2, message="two steps parked for the slot"
    )

    # When ops scrape
    held = scrape(client)

    # Then the gauges show it
    assert sample(held, "cao_slots_in_use", service="prompt_enhancer") == 1
    assert sample(held, "cao_slot_waiters", service="prompt_enhancer") == 2
    assert sample(held, "cao_slot_limit", service="prompt_enhancer") == 1
    assert sample(held, "cao_slots_in_use", service="fast_chat_llm") == 0

    # And once the work is done, they drop back
    gate.open()
    for job in jobs:
        wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED, message="the jobs to complete")
    done = scrape(client)
    assert sample(done, "cao_slots_in_use", service="prompt_enhancer") == 0
    assert sample(done, "cao_slot_waiters", service="prompt_enhancer") == 0


def test_queue_depth_counts_messages_not_yet_picked_up(client, registry):
    from jobs.outcomes import StepDispatch
    from orchestration.dispatch import send_step

    # Given no worker running: two first steps sent to the default queue, and a retry due in a minute
    queued = [submit_job(feature_name="business_plan", input_data={"n": n})[0] for n in range(2)]
    send_step(StepDispatch(queued[0].pk, 0, queued[0].step_token, "prompt_enhancer", delay_s=60))
    send_step(StepDispatch(queued[1].pk, 1, queued[1].step_token, "fast_chat_llm"))

    text = scrape(client)

    assert sample(text, "cao_queue_depth", queue="default", kind="ready") == 2
    assert sample(text, "cao_queue_depth", queue="default", kind="delayed") == 1
    assert sample(text, "cao_queue_depth", queue="medium", kind="ready") == 1
    assert sample(text, "cao_queue_depth", queue="medium", kind="delayed") == 0
    assert sample(text, "cao_queue_depth", queue="heavy", kind="ready") == 0


def test_a_missing_series_is_not_read_as_zero():
    text = 'cao_slots_in_use{service="fast_chat_llm"} 0.0\n'

    assert sample(text, "cao_slots_in_use", service="fast_chat_llm") == 0
    with pytest.raises(AssertionError, match="no series cao_slots_in_use"):
        sample(text, "cao_slots_in_use", service="video_gen_v2")
    assert sample(text, "cao_slots_in_use", 0.0, service="video_gen_v2") == 0


def test_failures_retries_and_slot_waits_are_counted(client, registry, simulator, worker, wait, fast_retries):
    from services_registry.models import Service

    Service.objects.filter(name="summarizer_pro").update(max_attempts=2)
    Service.objects.filter(name="fast_chat_llm").update(concurrency_limit=1)
    simulator.configure(fail={"summarizer_pro": "503"}, latency={"fast_chat_llm": "150ms"})
    before = scrape(client)

    jobs = [submit_job(feature_name="business_plan", input_data={"n": n})[0] for n in range(3)]
    for job in jobs:
        wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.FAILED, message="the jobs to fail")
    after = scrape(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, 0.0, **labels)

    assert delta("cao_step_retries_total", service="summarizer_pro", error_code="RESOURCE_EXHAUSTED") == 3
    assert delta("cao_jobs_failed_total", feature="business_plan", error_code="RESOURCE_EXHAUSTED") == 3
    assert delta("cao_step_duration_seconds_count", service="summarizer_pro", outcome="RESOURCE_EXHAUSTED") == 6
    assert delta("cao_slot_wait_seconds_count", service="fast_chat_llm") >= 1


def _service_disabled(job):
    from orchestration.engine import Engine
    from services_registry.models import Service

    Service.objects.filter(name="prompt_enhancer").update(enabled=False)
    Engine().run_step(job.pk, 0, job.step_token)


def _stuck(job):
    from datetime import timedelta

    from django.utils import timezone

    from orchestration.maintenance import run_maintenance

    Job.objects.filter(pk=job.pk).update(last_progress_at=timezone.now() - timedelta(days=1))
    run_maintenance()


def _worker_lost(job, *, attempts_left):
    from django.db import transaction

    from jobs.state import lock_job
    from jobs.steps import step_claim
    from orchestration.maintenance import mark_attempt_lost
    from services_registry.models import Service
    from services_registry.selectors import service_live

    Service.objects.filter(name="prompt_enhancer").update(max_attempts=1 + attempts_left)
    with transaction.atomic():
        step_claim(job=lock_job(job.pk), max_attempts=1 + attempts_left)
    with transaction.atomic():
        mark_attempt_lost(lock_job(job.pk), service_live("prompt_enhancer"))


@pytest.mark.parametrize(
    "how, error_code, job_failed, step_retried",
    [
        (_service_disabled, "SERVICE_UNAVAILABLE", 1, 0),
        (_stuck, "STUCK_DETECTED", 1, 0),
        (lambda job: _worker_lost(job, attempts_left=1), "WORKER_LOST", 0, 1),
        (lambda job: _worker_lost(job, attempts_left=0), "WORKER_LOST", 1, 0),
    ],
    ids=["service disabled", "stuck", "worker lost, retried", "worker lost, out of attempts"],
)
def test_every_way_a_job_fails_or_a_step_retries_is_counted_once(
    client, registry, how, error_code, job_failed, step_retried
):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    before = scrape(client)

    how(job)

    after = scrape(client)
    failed = sample(after, "cao_jobs_failed_total", 0.0, feature="business_plan", error_code=error_code) - sample(
        before, "cao_jobs_failed_total", 0.0, feature="business_plan", error_code=error_code
    )
    retried = sample(after, "cao_step_retries_total", 0.0, service="prompt_enhancer", error_code=error_code) - sample(
        before, "cao_step_retries_total", 0.0, service="prompt_enhancer", error_code=error_code
    )
    assert (failed, retried) == (job_failed, step_retried)
    assert (Job.objects.get(pk=job.pk).status == JobStatus.FAILED) == bool(job_failed)


def test_metrics_need_an_allowed_address_or_the_token(client, settings):
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 403

    settings.CAO_METRICS_TOKEN = "scrape-me"
    assert client.get("/metrics").status_code == 403
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3", HTTP_AUTHORIZATION="Bearer scrape-me").status_code == 200


def json_log_handler(stream):
    from pythonjsonlogger.json import JsonFormatter

    handler = logging.StreamHandler(stream)
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactSecretsFilter())
    handler.setFormatter(
        JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(step_index)s %(service)s %(attempt)s")
    )
    return handler


def test_a_failed_steps_log_line_carries_job_step_service_and_attempt(registry, simulator, worker, wait):
    stream = io.StringIO()
    handler = json_log_handler(stream)
    logging.getLogger().addHandler(handler)
    try:
        simulator.configure(fail={"fast_chat_llm": "400"})
        job, _ = submit_job(feature_name="business_plan", input_data={})
        wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.FAILED, message="the job to fail")
    finally:
        logging.getLogger().removeHandler(handler)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    [failed] = [line for line in lines if line["message"].startswith("Step failed")]
    assert failed["levelname"] == "WARNING"
    assert (failed["job_id"], failed["step_index"], failed["service"], failed["attempt"]) == (
        str(job.pk), 1, "fast_chat_llm", 1,
    )
    assert "DOWNSTREAM_REJECTED" in failed["message"]


def test_the_readable_format_appends_the_job_fields():
    record = logging.LogRecord("orchestration.engine", logging.INFO, __file__, 1, "Completed.", None, None)
    with log_context(job_id="j-1", step_index=2, service="summarizer_pro", attempt=3):
        JobContextFilter().filter(record)

    assert record.job_fields == " [job_id=j-1 step_index=2 service=summarizer_pro attempt=3]"


def test_secrets_are_masked_in_log_lines(settings):
    settings.INTERNAL_API_KEY = "internal-7c1d"
    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "sent %s with key %s", ("internal-7c1d", "cao_1a2b3c4d_" + "k" * 40), None
    )

    RedactSecretsFilter().filter(record)

    assert record.getMessage() == "sent *** with key cao_***"
    assert not re.search(r"internal-7c1d|kkkk", record.getMessage())
