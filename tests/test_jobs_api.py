"""The jobs API: contract, validation, ownership and conflict rules (no worker running)."""

import threading
import uuid

import pytest
from django.db import connection, transaction

from jobs.models import Job, JobEvent, JobStatus, StepState
from jobs.monitor import token_allows

pytestmark = pytest.mark.django_db


def create(api, feature="business_plan", input_data=None, **headers):
    return api.post(
        "/api/v1/jobs",
        {"feature_name": feature, "input_data": input_data if input_data is not None else {"topic": "tea"}},
        format="json",
        **headers,
    )


def assert_error(response, status, code):
    assert response.status_code == status, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


def test_create_returns_the_brief_body_and_a_pending_job(api, registry):
    response = create(api)

    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"success", "job_id", "monitor_url", "status"}
    assert body["success"] is True and body["status"] == "PENDING"
    job = Job.objects.get(pk=body["job_id"])
    assert job.steps == ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"]
    assert job.context == {"initial_input": {"topic": "tea"}}
    assert job.owner == api.api_key
    assert (job.step_state, job.step_token, job.current_step_index) == (StepState.QUEUED, 1, 0)


def test_monitor_url_is_built_from_the_request_and_carries_a_token_for_that_job(api, registry, settings):
    settings.ALLOWED_HOSTS = ["gateway.example", "gw.example"]
    plain = create(api, HTTP_HOST="gateway.example:8443").json()
    secure = create(api, HTTP_HOST="gw.example", secure=True).json()

    assert plain["monitor_url"].startswith(f"ws://gateway.example:8443/ws/{plain['job_id']}?token=")
    assert secure["monitor_url"].startswith(f"wss://gw.example/ws/{secure['job_id']}?token=")
    token = plain["monitor_url"].split("token=")[1]
    assert token_allows(token, plain["job_id"])
    assert not token_allows(token, secure["job_id"])


def test_idempotency_key_returns_the_same_job(api, registry):
    first = create(api, HTTP_IDEMPOTENCY_KEY="order-42")
    second = create(api, HTTP_IDEMPOTENCY_KEY="order-42")

    assert first.status_code == 201 and second.status_code == 200
    assert first.json()["job_id"] == second.json()["job_id"]
    assert Job.objects.count() == 1


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_creates_with_one_idempotency_key_make_one_job(api, registry, wait):
    from api_keys.models import ApiKey

    assert api.get("/api/v1/jobs").status_code == 200  # the key's last_used_at is fresh: no write at auth
    responses = []

    def create_in_thread():
        from rest_framework.test import APIClient

        client = APIClient()
        client.credentials(HTTP_X_API_KEY=api.api_key.raw_key)
        try:
            responses.append(create(client, HTTP_IDEMPOTENCY_KEY="order-77"))
        except Exception as exc:
            responses.append(exc)
        finally:
            connection.close()

    # When two creates with the same key both look for an earlier job before either has inserted one:
    # the test holds the API key's row, which each insert must lock (the owner foreign key)
    threads = [threading.Thread(target=create_in_thread) for _ in range(2)]
    with transaction.atomic():
        ApiKey.objects.select_for_update().get(pk=api.api_key.pk)
        for thread in threads:
            thread.start()
        wait(lambda: backends_waiting_for_a_lock() == 2, message="both inserts to wait")
    for thread in threads:
        thread.join(30)

    # Then one creates the job, the other answers with that same job, and there is one row
    assert all(not isinstance(response, Exception) for response in responses), responses
    assert sorted(response.status_code for response in responses) == [200, 201]
    assert len({response.json()["job_id"] for response in responses}) == 1
    assert Job.objects.count() == 1


def test_idempotency_key_reused_with_another_request_is_a_conflict(api, registry):
    create(api, HTTP_IDEMPOTENCY_KEY="order-42")
    response = create(api, input_data={"topic": "coffee"}, HTTP_IDEMPOTENCY_KEY="order-42")

    assert_error(response, 409, "IDEMPOTENCY_KEY_REUSED")


def test_idempotency_keys_are_scoped_per_client(api, staff_api, registry):
    mine = create(api, HTTP_IDEMPOTENCY_KEY="k1").json()["job_id"]
    theirs = create(staff_api, HTTP_IDEMPOTENCY_KEY="k1").json()["job_id"]

    assert mine != theirs


@pytest.mark.parametrize(
    "body, status, code",
    [
        ('{"feature_name": ', 400, "MALFORMED_JSON"),
        ('[1, 2]', 400, "INVALID_INPUT"),
        ('{"input_data": {}}', 400, "INVALID_INPUT"),
        ('{"feature_name": "nope", "input_data": {}}', 400, "UNKNOWN_FEATURE"),
        ('{"feature_name": "business_plan", "input_data": [1]}', 400, "INVALID_INPUT"),
        ('{"feature_name": "business_plan", "input_data": "text"}', 400, "INVALID_INPUT"),
        ('{"feature_name": 12, "input_data": {}}', 400, "UNKNOWN_FEATURE"),
        ('{"feature_name": null, "input_data": {}}', 400, "INVALID_INPUT"),
    ],
)
def test_bad_create_requests_get_the_error_shape(api, registry, body, status, code):
    response = api.generic("POST", "/api/v1/jobs", body, content_type="application/json")

    assert_error(response, status, code)
    assert Job.objects.count() == 0


def test_a_disabled_feature_is_refused(api, registry):
    from services_registry.models import Recipe

    Recipe.objects.filter(name="viral_video").update(enabled=False)

    error = assert_error(create(api, feature="viral_video"), 400, "FEATURE_DISABLED")
    assert error["message"] == "Feature 'viral_video' is disabled."
    assert Job.objects.count() == 0
    assert create(api, feature="business_plan").status_code == 201  # other features still run


def test_a_feature_using_a_disabled_service_is_refused(api, registry):
    registry["video_gen_v2"].enabled = False
    registry["video_gen_v2"].save()

    error = assert_error(create(api, feature="viral_video"), 400, "FEATURE_DISABLED")
    assert "service video_gen_v2 is disabled" in error["message"]
    assert Job.objects.count() == 0
    assert create(api, feature="business_plan").status_code == 201  # features without it still run


def test_invalid_idempotency_key_is_refused(api, registry):
    assert_error(create(api, HTTP_IDEMPOTENCY_KEY="x" * 300), 400, "INVALID_INPUT")


def test_requests_without_a_valid_key_are_refused(client, registry):
    assert_error(client.get("/api/v1/jobs"), 401, "NOT_AUTHENTICATED")
    assert_error(client.get("/api/v1/jobs", HTTP_X_API_KEY="cao_deadbeef_nope"), 401, "AUTHENTICATION_FAILED")
    assert_error(client.get("/api/v1/jobs", HTTP_AUTHORIZATION="Api-Key garbage"), 401, "AUTHENTICATION_FAILED")


def test_health_needs_no_key(client):
    assert client.get("/api/v1/health").json() == {"ok": True}


def test_get_job_shows_status_progress_steps_and_error(api, registry):
    job_id = create(api).json()["job_id"]

    body = api.get(f"/api/v1/jobs/{job_id}").json()

    assert body["job_id"] == job_id
    assert body["status"] == "PENDING"
    assert (body["current_step_index"], body["total_steps"], body["completed_steps"]) == (0, 4, 0)
    assert [step["service"] for step in body["steps"]] == Job.objects.get(pk=job_id).steps
    assert {step["state"] for step in body["steps"]} == {"pending"}
    assert body["error"] is None
    assert body["context"] == {"initial_input": {"topic": "tea"}}


@pytest.mark.parametrize("job_id", ["not-a-uuid", str(uuid.uuid4()), "1' OR '1'='1"])
def test_unknown_or_malformed_ids_are_404_everywhere(api, registry, job_id):
    assert_error(api.get(f"/api/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
    assert_error(api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json"), 404, "JOB_NOT_FOUND")
    assert_error(api.post(f"/api/v1/jobs/{job_id}/cancel"), 404, "JOB_NOT_FOUND")
    assert_error(api.get(f"/api/v1/jobs/{job_id}/events"), 404, "JOB_NOT_FOUND")


def test_other_clients_jobs_are_404_but_staff_see_them(api, staff_api, registry):
    from api_keys.models import ApiKey
    from rest_framework.test import APIClient

    _, other_raw = ApiKey.objects.create_key(name="other")
    other = APIClient()
    other.credentials(HTTP_X_API_KEY=other_raw)
    job_id = create(api).json()["job_id"]

    assert_error(other.get(f"/api/v1/jobs/{job_id}"), 404, "JOB_NOT_FOUND")
    assert_error(other.post(f"/api/v1/jobs/{job_id}/cancel"), 404, "JOB_NOT_FOUND")
    assert other.get("/api/v1/jobs").json()["results"] == []
    assert staff_api.get(f"/api/v1/jobs/{job_id}").status_code == 200


def fail_job(job_id, *, retryable=True, code="RESOURCE_EXHAUSTED"):
    Job.objects.filter(pk=job_id).update(
        status=JobStatus.FAILED, step_state=StepState.IDLE, retryable=retryable, error_code=code,
        error_message="boom", current_step_index=1,
    )


def test_resume_continues_a_retryable_failure_from_the_current_step(api, registry):
    job_id = create(api).json()["job_id"]
    fail_job(job_id)

    response = api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json")

    assert response.status_code == 200
    assert response.json() == {
        "success": True, "job_id": job_id, "previous_status": "FAILED", "new_status": "RUNNING",
        "resuming_from_step": 1,
    }
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.step_state, job.step_attempt, job.error_code) == ("RUNNING", "QUEUED", 0, "")
    assert JobEvent.objects.get(job=job).type == "JOB_RESUMED"


@pytest.mark.parametrize("status", ["COMPLETED", "CANCELLED", "RUNNING", "PENDING"])
def test_resume_of_a_job_that_is_not_failed_is_a_conflict(api, registry, status):
    job_id = create(api).json()["job_id"]
    Job.objects.filter(pk=job_id).update(status=status)

    error = assert_error(api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json"), 409, "JOB_NOT_RESUMABLE")
    assert status in error["message"]


def test_non_retryable_failures_need_a_staff_force(api, staff_api, registry):
    job_id = create(api).json()["job_id"]
    fail_job(job_id, retryable=False, code="DOWNSTREAM_REJECTED")

    assert_error(api.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json"), 409, "JOB_NOT_RESUMABLE")
    assert_error(api.post(f"/api/v1/jobs/{job_id}/resume", {"force": True}, format="json"), 403, "FORCE_REQUIRES_STAFF")
    response = staff_api.post(f"/api/v1/jobs/{job_id}/resume", {"force": True}, format="json")
    assert response.status_code == 200 and response.json()["new_status"] == "RUNNING"
    assert JobEvent.objects.get(job_id=job_id, type="JOB_RESUMED").payload["forced"] is True


def test_force_on_a_retryable_failure_is_an_ordinary_resume(staff_api, registry):
    job_id = create(staff_api).json()["job_id"]
    fail_job(job_id, retryable=True)

    assert staff_api.post(f"/api/v1/jobs/{job_id}/resume", {"force": True}, format="json").status_code == 200
    assert JobEvent.objects.get(job_id=job_id, type="JOB_RESUMED").payload["forced"] is False


def test_resume_body_must_be_an_object_with_a_boolean_force(api, registry):
    job_id = create(api).json()["job_id"]
    fail_job(job_id)

    assert_error(api.post(f"/api/v1/jobs/{job_id}/resume", {"force": "maybe"}, format="json"), 400, "INVALID_INPUT")
    assert_error(
        api.generic("POST", f"/api/v1/jobs/{job_id}/resume", "[]", content_type="application/json"), 400, "INVALID_INPUT"
    )


def backends_waiting_for_a_lock():
    """How many other sessions of this database are blocked on a lock right now."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")  # pg_stat_activity is cached per transaction
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
        )
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_two_concurrent_resumes_one_wins_one_conflicts(api, registry, wait):
    # Given a failed job
    job_id = create(api).json()["job_id"]
    fail_job(job_id)
    results = []

    def resume():
        from rest_framework.test import APIClient

        client = APIClient()
        client.credentials(HTTP_X_API_KEY=api.api_key.raw_key)
        try:
            results.append(client.post(f"/api/v1/jobs/{job_id}/resume", {}, format="json").status_code)
        except Exception as exc:  # e.g. the IntegrityError of two JOB_RESUMED events with one seq
            results.append(repr(exc))
        finally:
            connection.close()

    # When two resumes arrive while the job's row is locked by a third session (here, the test),
    # so that both have read the job before either can write: the race, every time
    threads = [threading.Thread(target=resume) for _ in range(2)]
    with transaction.atomic():
        Job.objects.select_for_update().get(pk=job_id)
        for thread in threads:
            thread.start()
        wait(lambda: backends_waiting_for_a_lock() == 2, message="both resumes to wait on the job's row")
    for thread in threads:
        thread.join(30)

    # Then the row lock serialises them: the second sees RUNNING and conflicts
    assert sorted(results, key=str) == [200, 409], results
    assert JobEvent.objects.filter(job_id=job_id, type="JOB_RESUMED").count() == 1


def test_cancel_stops_the_job_and_a_second_cancel_conflicts(api, registry):
    job_id = create(api).json()["job_id"]

    response = api.post(f"/api/v1/jobs/{job_id}/cancel")

    assert response.status_code == 200
    assert response.json() == {"success": True, "job_id": job_id, "previous_status": "PENDING", "new_status": "CANCELLED"}
    job = Job.objects.get(pk=job_id)
    assert (job.status, job.step_state) == ("CANCELLED", "IDLE")
    assert job.finished_at is not None
    assert_error(api.post(f"/api/v1/jobs/{job_id}/cancel"), 409, "JOB_NOT_CANCELLABLE")


def test_list_filters_and_paginates_newest_first(api, registry):
    ids = [create(api, feature=feature).json()["job_id"] for feature in ["business_plan", "viral_video"] * 3]
    Job.objects.filter(pk=ids[0]).update(status="FAILED")

    page = api.get("/api/v1/jobs?limit=4").json()
    assert [job["job_id"] for job in page["results"]] == ids[::-1][:4]
    rest = api.get(page["next"]).json()
    assert [job["job_id"] for job in rest["results"]] == ids[::-1][4:]
    assert rest["next"] is None

    videos = api.get("/api/v1/jobs?feature_name=viral_video").json()["results"]
    assert {job["feature_name"] for job in videos} == {"viral_video"} and len(videos) == 3
    failed = api.get("/api/v1/jobs?status=FAILED").json()["results"]
    assert [job["job_id"] for job in failed] == [ids[0]]
    assert_error(api.get("/api/v1/jobs?status=BOGUS"), 400, "INVALID_INPUT")
    assert_error(api.get("/api/v1/jobs?limit=abc"), 400, "INVALID_INPUT")
    assert_error(api.get("/api/v1/jobs?cursor=zzz"), 400, "INVALID_INPUT")


def test_events_endpoint_returns_events_after_a_seq(api, registry):
    job_id = create(api).json()["job_id"]
    api.post(f"/api/v1/jobs/{job_id}/cancel")

    everything = api.get(f"/api/v1/jobs/{job_id}/events").json()
    after_one = api.get(f"/api/v1/jobs/{job_id}/events?after=1").json()

    assert [event["type"] for event in everything["events"]] == ["JOB_CANCELLED"]
    assert everything["events"][0]["seq"] == 1 and everything["last_seq"] == 1
    assert after_one == {"job_id": job_id, "events": [], "last_seq": 1}
    assert_error(api.get(f"/api/v1/jobs/{job_id}/events?after=-1"), 400, "INVALID_INPUT")


def test_unknown_routes_and_methods_use_the_error_shape(api, registry):
    assert_error(api.get("/api/v1/nothing-here"), 404, "NOT_FOUND")
    assert_error(api.delete("/api/v1/jobs"), 405, "METHOD_NOT_ALLOWED")
    assert_error(api.put("/api/v1/features", {}, format="json"), 405, "METHOD_NOT_ALLOWED")
