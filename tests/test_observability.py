"""Metrics and structured logs: what ops see while the gateway works."""

import io
import json
import logging
import re

import pytest

from common.logs import JobContextFilter, RedactSecretsFilter, log_context
from jobs.models import Job, JobStatus
from orchestration.dispatch import submit_job

pytestmark = pytest.mark.django_db(transaction=True)


def scrape(client, **extra):
    response = client.get("/metrics", **extra)
    assert response.status_code == 200, response.content
    return response.content.decode()


def sample(text, name, **labels):
    """The value of one series in Prometheus text, 0.0 when absent."""
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
    return 0.0


def test_metrics_change_as_a_job_runs(client, registry, simulator, worker, wait):
    before = scrape(client)

    job, _ = submit_job(feature_name="business_plan", input_data={})
    wait(lambda: Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED, message="the job to complete")
    after = scrape(client)

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("cao_jobs_created_total", feature="business_plan") == 1
    assert delta("cao_jobs_completed_total", feature="business_plan") == 1
    for service in ("prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"):
        assert delta("cao_step_duration_seconds_count", service=service, outcome="success") == 1
    assert sample(after, "cao_slot_limit", service="video_gen_v2") == 2
    assert sample(after, "cao_slots_in_use", service="fast_chat_llm") == 0
    assert "cao_queue_depth" in after and 'queue="medium"' in after


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
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("cao_step_retries_total", service="summarizer_pro", error_code="RESOURCE_EXHAUSTED") == 3
    assert delta("cao_jobs_failed_total", feature="business_plan", error_code="RESOURCE_EXHAUSTED") == 3
    assert delta("cao_step_duration_seconds_count", service="summarizer_pro", outcome="RESOURCE_EXHAUSTED") == 6
    assert delta("cao_slot_wait_seconds_count", service="fast_chat_llm") >= 1


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
