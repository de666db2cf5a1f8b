"""The staff web pages, through Django's test client."""

import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

import pytest
from django.db import transaction
from django.utils import timezone

from api_keys.models import ApiKey
from jobs import steps as job_steps
from jobs.models import Job, JobEvent, JobStatus, StepAttempt, step_key
from jobs.outcomes import Failure
from jobs.state import lock_job
from jobs.waterfall import waterfall
from orchestration.commands import submit_job
from webhooks.models import Delivery, DeliveryAttempt

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client, make_staff):
    client.force_login(make_staff("ops", "jobs.view_job"))
    return client


def test_pages_need_a_staff_login(client, django_user_model, registry):
    job, _ = submit_job(feature_name="business_plan", input_data={})

    for url in ("/jobs/", f"/jobs/{job.pk}/"):
        response = client.get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]
    client.force_login(django_user_model.objects.create_user("someone", password="pw"))
    assert client.get("/jobs/").status_code == 302


def test_home_redirects_to_the_jobs_page(client):
    assert client.get("/")["Location"] == "/jobs/"


def test_jobs_page_lists_recent_jobs_with_progress_and_filters(staff_client, registry):
    plan, _ = submit_job(feature_name="business_plan", input_data={})
    video, _ = submit_job(feature_name="viral_video", input_data={})
    Job.objects.filter(pk=video.pk).update(status="FAILED", error_code="RESOURCE_EXHAUSTED")

    page = staff_client.get("/jobs/").content.decode()
    assert str(plan.pk)[:10] in page and str(video.pk)[:10] in page
    assert '<progress max="4" value="0">' in page and "RESOURCE_EXHAUSTED" in page

    failed = staff_client.get("/jobs/?status=FAILED").content.decode()
    assert str(video.pk)[:10] in failed and str(plan.pk)[:10] not in failed
    plans = staff_client.get("/jobs/?feature=business_plan&partial=1").content.decode()
    assert str(plan.pk)[:10] in plans and str(video.pk)[:10] not in plans and "<html" not in plans
    videos = staff_client.get("/jobs/?feature=viral_video").content.decode()
    assert str(video.pk)[:10] in videos and str(plan.pk)[:10] not in videos


def test_job_page_shows_the_timeline_and_events(staff_client, registry):
    job, _ = submit_job(feature_name="viral_video", input_data={})

    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()

    assert f'data-job-id="{job.pk}"' in page and 'data-last-seq="0"' in page
    for index, service in enumerate(["prompt_enhancer", "video_gen_v2", "email_notifier"]):
        assert f'data-index="{index}" data-state="pending"' in page and service in page


def test_job_page_never_shows_an_event_its_socket_will_replay(staff_client, registry, monkeypatch):
    """An event committed between reading the job and reading its events is left to the socket."""
    from jobs import selectors, views
    from jobs.events import append_events, event

    job, _ = submit_job(feature_name="viral_video", input_data={})
    read_job = selectors.job_get

    def read_then_a_worker_commits(job_id, **kwargs):
        snapshot = read_job(job_id, **kwargs)
        locked = Job.objects.get(pk=job.pk)
        append_events(locked, event("STEP_STARTED", step_index=0, attempt=1))
        locked.save(update_fields=["last_event_seq"])
        return snapshot

    monkeypatch.setattr(views.selectors, "job_get", read_then_a_worker_commits)
    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()

    assert 'data-last-seq="0"' in page and 'data-seq="1"' not in page


def test_unknown_job_page_is_a_404(staff_client):
    assert staff_client.get("/jobs/not-a-job/").status_code == 404


# --- The job page's work: input, outputs, errors, waterfall, what holds a step, deliveries, resume ---------


def page_data(client, job):
    response = client.get(f"/jobs/{job.pk}/data")
    assert response.status_code == 200, response.content
    assert response["Cache-Control"].startswith("max-age=0")
    return response.json()


def embedded_data(page):
    """The JSON the page carries for its first render (json_script), decoded."""
    found = re.search(r'<script id="job-data" type="application/json">(.*?)</script>', page, re.S)
    assert found, "the page carries no job-data"
    return json.loads(found[1])


def claim(job_id):
    with transaction.atomic():
        job = lock_job(job_id)
        job_steps.step_claim(job=job, max_attempts=3)
        return job


def run_step(job_id, *, data=None, failure=None, retry_delay_s=0.5):
    """One attempt at the job's current step: claimed, then recorded a success or ``failure``."""
    claim(job_id)
    with transaction.atomic():
        job = lock_job(job_id)
        if failure is None:
            job_steps.step_succeed(job=job, token=job.step_token, data=data, metrics={"execution_time_ms": 7})
        else:
            job_steps.step_fail(job=job, token=job.step_token, failure=failure, retry_delay_s=retry_delay_s)


UNAVAILABLE = Failure("RESOURCE_EXHAUSTED", "fast_chat_llm answered 503: try later", True, http_status=503)


def test_the_job_data_shows_the_input_each_output_and_the_error_of_each_failed_attempt(staff_client, registry):
    # Given a business plan whose first step succeeded and whose second failed once, then succeeded
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "a Mars bakery", "budget": 1000})
    run_step(job.pk, data={"enhanced_prompt": "A bakery on Mars, in sections"})
    run_step(job.pk, failure=UNAVAILABLE)
    run_step(job.pk, data={"text": "Draft"})

    # When ops open its page, and its data
    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()
    data = page_data(staff_client, job)

    # Then both carry the input, the outputs of the steps that ran, and the failed attempt's error
    assert data["input_data"] == {"topic": "a Mars bakery", "budget": 1000}
    first, second, third, fourth = data["steps"]
    assert first["output"]["data"] == {"enhanced_prompt": "A bakery on Mars, in sections"}
    assert first["output"]["status"] == "SUCCESS" and first["output"]["metrics"] == {"execution_time_ms": 7}
    assert [a["error"] for a in first["attempts"]] == [None]
    assert second["output"]["data"] == {"text": "Draft"}
    assert [(a["attempt"], a["outcome"]) for a in second["attempts"]] == [(1, "FAILED"), (2, "SUCCEEDED")]
    assert second["attempts"][0]["error"] == {
        "code": "RESOURCE_EXHAUSTED", "message": "fast_chat_llm answered 503: try later", "http_status": 503,
    }
    assert second["attempts"][1]["error"] is None
    assert third["output"] is None and third["attempts"] == [] and fourth["output"] is None
    embedded = embedded_data(page)
    for key in ("input_data", "steps", "held_by", "deliveries", "resume", "last_event_seq"):
        assert embedded[key] == data[key], key
    assert 'src="/static/jobs/job_work.js"' in page


def test_untrusted_outputs_and_errors_reach_the_page_only_as_escaped_json(staff_client, registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "<b>bold</b>"})
    hostile = '</script><script>alert("output")</script>'
    run_step(job.pk, data={"text": hostile})
    run_step(job.pk, failure=Failure("BAD", '<img src=x onerror=alert("error")>', True, http_status=500))

    page = staff_client.get(f"/jobs/{job.pk}/").content.decode()

    assert "<script>alert(" not in page and "<img src=x" not in page and "<b>bold" not in page
    data = embedded_data(page)
    assert data["steps"][0]["output"]["data"]["text"] == hostile
    assert data["steps"][1]["attempts"][0]["error"]["message"] == '<img src=x onerror=alert("error")>'
    assert data["input_data"] == {"topic": "<b>bold</b>"}
    # Every script is the project's own file, or JSON the browser never runs (the policy forbids inline code).
    for tag in re.findall(r"<script[^>]*>", page):
        assert 'src="/static/' in tag or 'type="application/json"' in tag, tag


def test_the_waterfall_of_the_real_records_has_the_call_the_back_off_and_the_retry_in_order(staff_client, registry):
    job, _ = submit_job(feature_name="business_plan", input_data={})
    run_step(job.pk, data={})
    run_step(job.pk, failure=UNAVAILABLE, retry_delay_s=0.2)
    run_step(job.pk, data={})

    waterfall = page_data(staff_client, job)["waterfall"]

    kinds = [(s["step_index"], s["kind"], s.get("attempt")) for s in waterfall["segments"]]
    assert kinds == [(0, "call", 1), (1, "call", 1), (1, "backoff", 1), (1, "call", 2)]
    failed, backoff, retry = waterfall["segments"][1:]
    assert failed["outcome"] == "FAILED" and failed["label"] == "fast_chat_llm · attempt 1 · FAILED (503 RESOURCE_EXHAUSTED)"
    assert backoff["label"] == "retry back-off after attempt 1 (RESOURCE_EXHAUSTED; retry in 200 ms)"
    assert failed["end_ms"] <= backoff["start_ms"] <= backoff["end_ms"] == retry["start_ms"] <= retry["end_ms"]
    assert not any(s["ongoing"] for s in waterfall["segments"][:3])
    assert waterfall["span_ms"] >= retry["end_ms"]


def at(ms):
    return T0 + timedelta(milliseconds=ms)


T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TWO_STEPS = ["prompt_enhancer", "fast_chat_llm"]


def attempt_row(step_index, attempt, start, end, outcome, **fields):
    return StepAttempt(
        step_index=step_index, service=TWO_STEPS[step_index], attempt=attempt, token=10 * step_index + attempt,
        outcome=outcome, started_at=at(start), finished_at=None if end is None else at(end), **fields,
    )


def event_row(type, ms, **payload):
    return {"type": type, "created_at": at(ms), "payload": payload}


def test_the_waterfall_draws_each_wait_call_and_back_off_from_when_it_began_to_what_came_next():
    # Given a job that waited for a slot of its first step, then called it; whose second step
    # failed, backed off, waited again (the budget was spent), and succeeded
    job = Job(steps=TWO_STEPS, status=JobStatus.COMPLETED, current_step_index=1, created_at=T0, finished_at=at(2000))
    attempts = [
        attempt_row(0, 1, 300, 500, "SUCCEEDED"),
        attempt_row(1, 1, 600, 900, "FAILED", http_status=503, error_code="RESOURCE_EXHAUSTED"),
        attempt_row(1, 2, 1500, 2000, "SUCCEEDED"),
    ]
    events = [
        event_row("WAITING_FOR_SLOT", 100, step_index=0, limit="concurrency", position=1),
        event_row("STEP_RETRYING", 900, step_index=1, attempt=1, error_code="RESOURCE_EXHAUSTED", retry_in_ms=200),
        event_row("WAITING_FOR_SLOT", 1100, step_index=1, limit="requests_per_minute", position=0),
    ]

    drawn = waterfall(job, attempts, events, now=at(5000))

    assert drawn["origin"] == T0.isoformat() and drawn["span_ms"] == 2000
    assert [(s["kind"], s["step_index"], s["start_ms"], s["end_ms"], s["ongoing"]) for s in drawn["segments"]] == [
        ("wait", 0, 100, 300, False),
        ("call", 0, 300, 500, False),
        ("call", 1, 600, 900, False),
        ("backoff", 1, 900, 1100, False),
        ("wait", 1, 1100, 1500, False),
        ("call", 1, 1500, 2000, False),
    ]
    waits = [s for s in drawn["segments"] if s["kind"] == "wait"]
    assert [(s["limit"], s["place"]) for s in waits] == [("concurrency", 2), ("requests_per_minute", 1)]
    assert waits[0]["label"] == "waiting for a slot of prompt_enhancer — held by concurrency, 2nd in line"


def test_what_still_goes_on_runs_to_now_and_a_stopped_job_ends_its_wait_at_the_stop():
    running = Job(steps=TWO_STEPS, status=JobStatus.RUNNING, current_step_index=1, created_at=T0)
    attempts = [attempt_row(0, 1, 0, 100, "SUCCEEDED"), attempt_row(1, 1, 200, None, "RUNNING")]
    drawn = waterfall(running, attempts, [], now=at(700))
    assert drawn["segments"][-1] | {"label": None} == {
        "kind": "call", "step_index": 1, "service": "fast_chat_llm", "start_ms": 200, "end_ms": 700,
        "ongoing": True, "label": None, "attempt": 1, "outcome": "RUNNING", "http_status": None, "error_code": "",
    }
    assert drawn["span_ms"] == 700

    waiting = Job(steps=TWO_STEPS, status=JobStatus.RUNNING, current_step_index=0, created_at=T0)
    drawn = waterfall(waiting, [], [event_row("WAITING_FOR_SLOT", 50, step_index=0, limit="cool_down")], now=at(900))
    assert [(s["kind"], s["start_ms"], s["end_ms"], s["ongoing"]) for s in drawn["segments"]] == [("wait", 50, 900, True)]

    # A wait cut short by a cancel ends there, though the job's row moved on later
    cancelled = Job(steps=TWO_STEPS, status=JobStatus.CANCELLED, created_at=T0, finished_at=at(400), updated_at=at(9000))
    events = [event_row("WAITING_FOR_SLOT", 50, step_index=0, limit="concurrency"), event_row("JOB_CANCELLED", 400)]
    assert [(s["start_ms"], s["end_ms"]) for s in waterfall(cancelled, [], events, now=at(9999))["segments"]] == [(50, 400)]


def test_a_failure_that_ended_the_run_is_no_back_off_before_the_resumed_attempt():
    job = Job(steps=TWO_STEPS, status=JobStatus.COMPLETED, current_step_index=1, created_at=T0, finished_at=at(9000))
    attempts = [
        attempt_row(0, 1, 0, 100, "SUCCEEDED"),
        attempt_row(1, 1, 200, 300, "FAILED", error_code="BAD_INPUT"),
        attempt_row(1, 1, 8000, 9000, "SUCCEEDED"),  # resumed by hand much later: a fresh budget
    ]
    events = [event_row("JOB_ERROR", 300, step_index=1, error_code="BAD_INPUT")]

    drawn = waterfall(job, attempts, events, now=at(9999))

    assert [s["kind"] for s in drawn["segments"]] == ["call", "call", "call"]


@pytest.mark.parametrize(
    "park, limit, text",
    [
        ({}, "concurrency", "waiting for a slot of prompt_enhancer — held by concurrency, 3rd in line"),
        ({"rate_limited_until": True}, "requests_per_minute",
         "waiting for a slot of prompt_enhancer — held by requests_per_minute, 3rd in line"),
        ({"rate_limited_until": True, "rate_limit": "tokens_per_minute"}, "tokens_per_minute",
         "waiting for a slot of prompt_enhancer — held by tokens_per_minute, 3rd in line"),
        ({"cooling_until": True}, "cool_down", "waiting for a slot of prompt_enhancer — held by cool_down, 3rd in line"),
        ({"circuit_open": True}, "circuit_open",
         "waiting for a slot of prompt_enhancer — held by circuit_open, 3rd in line"),
        ({"tenant_capped": True}, "key_concurrency",
         "waiting for a slot of prompt_enhancer — held by key_concurrency, 3rd in line"),
    ],
)
def test_a_waiting_step_says_which_limit_holds_it_and_its_place_in_line(staff_client, registry, park, limit, text):
    # Given a job whose first step parked with two callers ahead of it, for the given reason
    job, _ = submit_job(feature_name="business_plan", input_data={})
    later = timezone.now() + timedelta(seconds=30)
    park = {name: later if value is True else value for name, value in park.items()}
    with transaction.atomic():
        job_steps.step_park(job=lock_job(job.pk), position=2, **park)

    data = page_data(staff_client, job)

    # Then the data names the limit and the place, and the wait runs on in the waterfall
    held = data["held_by"]
    assert (held["step_index"], held["service"], held["limit"], held["place"], held["text"]) == (
        0, "prompt_enhancer", limit, 3, text,
    )
    assert held["until"] == (later.isoformat() if park.keys() & {"rate_limited_until", "cooling_until"} else None)
    [wait] = data["waterfall"]["segments"]
    assert (wait["kind"], wait["limit"], wait["ongoing"], wait["label"]) == ("wait", limit, True, text)

    # And once the step gets its slot, nothing holds it any more: the wait ends where the call starts
    claim(job.pk)
    data = page_data(staff_client, job)
    assert data["held_by"] is None
    wait, call = data["waterfall"]["segments"]
    assert wait["end_ms"] == call["start_ms"] and not wait["ongoing"] and call["ongoing"]


def test_a_job_held_by_its_keys_cap_says_so_with_its_place_among_the_held(staff_client, registry, client_key):
    ApiKey.objects.filter(pk=client_key.pk).update(max_concurrent_jobs=1)
    submit_job(feature_name="business_plan", input_data={}, owner=client_key)
    held, _ = submit_job(feature_name="business_plan", input_data={}, owner=client_key)

    data = page_data(staff_client, held)

    assert data["held_by"]["text"] == "waiting for one of its API key's places — held by key_jobs, 1st in line"
    assert data["held_by"]["place"] == 1


def make_delivery(job, seq, state, *attempts, event_type="JOB_COMPLETED", next_attempt_at=None):
    now = timezone.now()
    delivery = Delivery.objects.create(
        job=job, seq=seq, event_type=event_type, payload={"type": event_type}, url=job.webhook_url, state=state,
        attempts=len(attempts), next_attempt_at=next_attempt_at or now, give_up_at=now + timedelta(days=1),
        created_at=now, last_status_code=attempts[-1][1] if attempts else None,
        last_error="" if state == "DELIVERED" else "HTTP 500",
    )
    for number, (latency_ms, status_code) in enumerate(attempts, start=1):
        DeliveryAttempt.objects.create(
            delivery=delivery, number=number, started_at=now, latency_ms=latency_ms, status_code=status_code,
            outcome="DELIVERED" if status_code < 300 else "HTTP_ERROR",
        )
    return delivery


def webhook_job(url="https://hooks.example.com/cao"):
    job, _ = submit_job(feature_name="business_plan", input_data={})
    Job.objects.filter(pk=job.pk).update(webhook_url=url)
    job.webhook_url = url
    return job


def test_the_job_data_lists_its_webhook_deliveries_with_their_latest_attempt(staff_client, registry):
    job = webhook_job()
    retry_at = timezone.now() + timedelta(minutes=2)
    make_delivery(job, 3, "DELIVERED", (120, 500), (45, 204), event_type="STEP_COMPLETED")
    make_delivery(job, 9, "PENDING", (300, 500), next_attempt_at=retry_at)
    make_delivery(webhook_job(), 3, "DELIVERED", (10, 200))  # another job's

    data = page_data(staff_client, job)

    assert data["webhook_url"] == "https://hooks.example.com/cao"
    rows = [
        {key: d[key] for key in ("seq", "event_type", "state", "attempts", "last_status_code", "last_latency_ms",
                                  "next_attempt_at")}
        for d in data["deliveries"]
    ]
    assert rows == [
        {"seq": 3, "event_type": "STEP_COMPLETED", "state": "DELIVERED", "attempts": 2, "last_status_code": 204,
         "last_latency_ms": 45, "next_attempt_at": None},
        {"seq": 9, "event_type": "JOB_COMPLETED", "state": "PENDING", "attempts": 1, "last_status_code": 500,
         "last_latency_ms": 300, "next_attempt_at": retry_at.isoformat()},
    ]
    assert data["deliveries"][0]["webhook_id"] == f"evt_{job.pk.hex}_3"
    # (jobs.view_job alone opens no delivery log: the admin would refuse it)
    assert data["delivery_log_url"] is None and "admin_url" not in data["deliveries"][0]


def test_who_may_read_deliveries_gets_links_to_the_admins_delivery_log(client, make_staff, registry):
    job = webhook_job()
    delivery = make_delivery(job, 3, "DELIVERED", (45, 204))
    other = make_delivery(webhook_job(), 4, "FAILED", (45, 500))
    client.force_login(make_staff("ops", "jobs.view_job", "webhooks.view_delivery"))

    data = page_data(client, job)

    assert data["deliveries"][0]["admin_url"] == f"/admin/webhooks/delivery/{delivery.pk}/change/"
    log = client.get(data["delivery_log_url"])
    assert log.status_code == 200
    listed = log.content.decode()
    assert delivery.webhook_id in listed and other.webhook_id not in listed
    assert client.get(data["deliveries"][0]["admin_url"]).status_code == 200


def replay(client, curl, api_key):
    """Send what a ``curl -X POST <url> -H ... [-d ...]`` command line says, through the test client."""
    words = shlex.split(curl.replace("$CAO_KEY", api_key.raw_key))
    assert words[:4] == ["curl", "-s", "-X", "POST"]
    url, headers, body = words[4], {}, None
    rest = iter(words[5:])
    for flag in rest:
        value = next(rest)
        if flag == "-H":
            name, _, header_value = value.partition(": ")
            headers["HTTP_" + name.upper().replace("-", "_")] = header_value
        else:
            assert flag == "-d"
            body = value
    content_type = headers.pop("HTTP_CONTENT_TYPE", "application/octet-stream")
    return client.post(urlsplit(url).path, data=body or "", content_type=content_type, **headers)


@pytest.mark.parametrize("retryable", [True, False])
def test_an_operator_gets_a_curl_that_resumes_the_failed_job(client, make_staff, registry, staff_key, retryable):
    job, _ = submit_job(feature_name="business_plan", input_data={})
    Job.objects.filter(pk=job.pk).update(status=JobStatus.FAILED, step_state="IDLE", retryable=retryable,
                                         error_code="RESOURCE_EXHAUSTED")
    client.force_login(make_staff("operator", "jobs.view_job", "jobs.change_job"))

    resume = page_data(client, job)["resume"]

    url = f"http://testserver/api/v1/jobs/{job.pk}/resume"
    if retryable:
        assert resume == {"curl": f'curl -s -X POST {url} -H "X-API-Key: $CAO_KEY"', "force": False}
    else:
        assert resume == {
            "curl": f"""curl -s -X POST {url} -H "X-API-Key: $CAO_KEY" -H "Content-Type: application/json" """
                    """-d '{"force": true}'""",
            "force": True,
        }
    # The command does what it says: sent as written, with a staff key, it resumes the job
    client.logout()
    response = replay(client, resume["curl"], staff_key)
    assert response.status_code == 200, response.content
    assert response.json()["new_status"] == "RUNNING"
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING


def test_no_resume_command_for_a_job_that_cannot_be_resumed_or_a_user_who_may_not(client, make_staff, registry):
    running, _ = submit_job(feature_name="business_plan", input_data={})
    failed, _ = submit_job(feature_name="business_plan", input_data={})
    Job.objects.filter(pk=failed.pk).update(status=JobStatus.FAILED, retryable=True)
    client.force_login(make_staff("operator", "jobs.view_job", "jobs.change_job"))

    assert page_data(client, running)["resume"] is None
    assert page_data(client, failed)["resume"] is not None
    assert 'id="resume"' in client.get(f"/jobs/{failed.pk}/").content.decode()
    # A view-only user sees neither the resume button nor the command
    client.force_login(make_staff("looker", "jobs.view_job"))
    page = client.get(f"/jobs/{failed.pk}/").content.decode()
    assert 'id="resume"' not in page and embedded_data(page)["resume"] is None
    assert page_data(client, failed)["resume"] is None


def test_the_data_needs_what_the_page_needs_and_refuses_in_the_error_shape(client, django_user_model, make_staff,
                                                                          registry):
    job, _ = submit_job(feature_name="business_plan", input_data={})
    url = f"/jobs/{job.pk}/data"

    anonymous = client.get(url)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "NOT_AUTHENTICATED"
    client.force_login(django_user_model.objects.create_user("someone", password="pw"))
    not_staff = client.get(url)
    assert not_staff.status_code == 403 and not_staff.json()["error"]["code"] == "PERMISSION_DENIED"
    client.force_login(make_staff("bare"))
    assert client.get(url).status_code == 403
    # ... the same answer for a job that does not exist: a refusal tells nothing
    assert client.get("/jobs/00000000-0000-0000-0000-000000000000/data").json() == client.get(url).json()

    client.force_login(make_staff("operator", "jobs.change_job"))
    assert client.get(url).status_code == 200
    for missing in ("not-a-job", "00000000-0000-0000-0000-000000000000"):
        response = client.get(f"/jobs/{missing}/data")
        assert response.status_code == 404 and response.json()["error"]["code"] == "JOB_NOT_FOUND"
    assert client.post(url).status_code == 405


def big_job(steps=12, attempts_per_step=3, deliveries=10):
    """A job with many steps, attempts, waits, retries and deliveries, written straight as rows."""
    now = timezone.now()
    services = ["prompt_enhancer"] * steps
    job = Job.objects.create(
        feature_name="big", steps=services, status=JobStatus.COMPLETED, current_step_index=steps - 1,
        context={"initial_input": {"n": 1}, **{step_key(i, s): {"data": {"i": i}} for i, s in enumerate(services)}},
        webhook_url="https://hooks.example.com/cao", finished_at=now,
    )
    rows, events, seq = [], [], 0
    for index in range(steps):
        for number in range(1, attempts_per_step + 1):
            seq += 1
            events.append(JobEvent(job=job, seq=seq, type="WAITING_FOR_SLOT", created_at=now,
                                   payload={"step_index": index, "limit": "concurrency", "position": 0}))
            rows.append(StepAttempt(job=job, step_index=index, service=services[index], attempt=number,
                                    token=len(rows) + 1, outcome="FAILED", started_at=now, finished_at=now,
                                    error_code="X", error_message="x"))
            seq += 1
            events.append(JobEvent(job=job, seq=seq, type="STEP_RETRYING", created_at=now,
                                   payload={"step_index": index, "attempt": number, "retry_in_ms": 10}))
    StepAttempt.objects.bulk_create(rows)
    JobEvent.objects.bulk_create(events)
    Job.objects.filter(pk=job.pk).update(last_event_seq=seq)
    for n in range(deliveries):
        make_delivery(job, n + 1, "DELIVERED", (10, 500), (20, 200))
    return Job.objects.get(pk=job.pk)


def test_the_page_and_its_data_cost_as_many_queries_for_a_big_job_as_for_a_small_one(
    client, make_staff, registry, django_assert_max_num_queries
):
    client.force_login(make_staff("ops", "jobs.view_job", "jobs.change_job", "webhooks.view_delivery"))
    small = big_job(steps=1, attempts_per_step=1, deliveries=1)
    big = big_job()
    for url in ("/jobs/{}/", "/jobs/{}/data"):
        client.get(url.format(small.pk))  # warm: the session, the user, its permissions
        with django_assert_max_num_queries(12) as few:
            assert client.get(url.format(small.pk)).status_code == 200

        with django_assert_max_num_queries(len(few.captured_queries)):
            response = client.get(url.format(big.pk))
        assert response.status_code == 200
    data = response.json()
    assert len(data["steps"]) == 12 and len(data["waterfall"]["segments"]) == 12 * 3 * 3
    assert len(data["deliveries"]) == 10 and all(d["last_latency_ms"] == 20 for d in data["deliveries"])
