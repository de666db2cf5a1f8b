"""Webhooks end to end in this process: the API, real PostgreSQL, a real Dramatiq worker on the Redis broker,
the simulator, and a real HTTP receiver that verifies signatures with the standardwebhooks package."""

import socket
from datetime import timedelta

import pytest
from django.utils import timezone
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from api_keys.models import ApiKey
from api_keys.services import webhook_secret_rotate
from jobs.models import Job, JobEvent
from tests.webhook_receiver import WebhookReceiver
from webhooks import addresses, delivery, retry
from webhooks.models import AttemptOutcome, Delivery, DeliveryAttempt, DeliveryState

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture
def webhooks_settings(settings):
    """The receiver runs on 127.0.0.1, which an operator must allow; retries in tens of milliseconds."""
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.CAO_WEBHOOK_RETRY_BASE_S = 0.05
    settings.CAO_WEBHOOK_RETRY_MAX_DELAY_S = 0.2
    settings.CAO_WEBHOOK_TIMEOUT_S = 5.0
    return settings


def create(api, url, **fields):
    response = api.post(
        "/api/v1/jobs",
        {"feature_name": "business_plan", "input_data": {"topic": "tea"}, "webhook_url": url, **fields},
        format="json",
    )
    assert response.status_code == 201, response.content
    return response.json()["job_id"]


def secret_of(api):
    response = api.get("/api/v1/webhooks/secret")
    assert response.status_code == 200, response.content
    return response.json()["secret"]


def finished_deliveries(wait, job_id, count):
    return wait(
        lambda: (
            rows := list(Delivery.objects.filter(job_id=job_id).exclude(state=DeliveryState.PENDING).order_by("seq"))
        ) and len(rows) >= count and rows,
        timeout=30,
        message=f"{count} deliveries of job {job_id} to finish",
    )


def event_payload(job_id, event_type):
    return JobEvent.objects.get(job_id=job_id, type=event_type).payload


# --- Delivery: retries, one webhook-id, signatures ------------------------------------------------


def test_a_receiver_that_fails_twice_gets_three_signed_attempts_of_one_event(
    api, registry, simulator, worker, wait, webhooks_settings
):
    # Given a receiver that answers 500 twice, then 200
    with WebhookReceiver(statuses=[500, 503]) as receiver:
        # When a job with a webhook completes
        job_id = create(api, receiver.url())
        [done] = finished_deliveries(wait, job_id, 1)

        # Then the completion event was POSTed three times, under one webhook-id, each validly signed
        requests = receiver.requests()
    secret = secret_of(api)
    assert secret.startswith("whsec_")
    assert [request.status for request in requests] == [500, 503, 200]
    assert {request.webhook_id for request in requests} == {done.webhook_id}
    completed = event_payload(job_id, "JOB_COMPLETED")
    for request in requests:
        assert request.verify(secret) == completed
        assert request.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-signature"].startswith("v1,")
    assert done.state == DeliveryState.DELIVERED and done.attempts == 3 and done.last_status_code == 200
    log = list(DeliveryAttempt.objects.filter(delivery=done).order_by("number"))
    assert [(a.number, a.outcome, a.status_code) for a in log] == [
        (1, AttemptOutcome.HTTP_ERROR, 500), (2, AttemptOutcome.HTTP_ERROR, 503), (3, AttemptOutcome.DELIVERED, 200),
    ]
    assert log[0].next_attempt_at is not None and log[2].next_attempt_at is None
    assert all(a.latency_ms is not None for a in log)


def test_a_signature_made_with_another_secret_does_not_verify(api, registry, simulator, worker, wait, webhooks_settings):
    with WebhookReceiver() as receiver:
        create(api, receiver.url())
        [request] = wait(receiver.accepted, timeout=30, message="the delivery")

    other = ApiKey.objects.create_key(name="other")[0].webhook_secret
    with pytest.raises(WebhookVerificationError):
        request.verify(other)
    tampered = request.body.replace("JOB_COMPLETED", "JOB_CANCELLED")
    with pytest.raises(WebhookVerificationError):
        Webhook(secret_of(api)).verify(tampered, request.headers)


def test_a_job_without_a_webhook_writes_no_delivery(api, registry, simulator, worker, wait):
    response = api.post("/api/v1/jobs", {"feature_name": "business_plan", "input_data": {}}, format="json")
    job_id = response.json()["job_id"]

    wait(lambda: Job.objects.get(pk=job_id).status == "COMPLETED", timeout=30, message="the job to complete")
    assert not Delivery.objects.exists()


# --- webhook_events and ordering ---------------------------------------------------------------


def test_webhook_events_chooses_what_is_delivered(api, registry, simulator, worker, wait, webhooks_settings):
    with WebhookReceiver() as receiver:
        job_id = create(api, receiver.url(), webhook_events=["STEP_COMPLETED", "JOB_COMPLETED"])
        finished_deliveries(wait, job_id, 5)
        types = [request.verify(secret_of(api))["type"] for request in receiver.accepted()]

    assert types == ["STEP_COMPLETED"] * 4 + ["JOB_COMPLETED"]
    # the default: how the job ends, only
    with WebhookReceiver() as receiver:
        job_id = create(api, receiver.url())
        finished_deliveries(wait, job_id, 1)
        assert [request.verify(secret_of(api))["type"] for request in receiver.accepted()] == ["JOB_COMPLETED"]
    assert Job.objects.get(pk=job_id).webhook_events == ["JOB_COMPLETED", "JOB_ERROR", "JOB_CANCELLED"]


def test_a_later_event_is_never_sent_before_an_earlier_one_is_delivered(
    api, registry, simulator, worker, wait, webhooks_settings
):
    # Given a receiver that refuses the first three requests (all of them the first event, retried)
    with WebhookReceiver(statuses=[500, 500, 500]) as receiver:
        job_id = create(api, receiver.url(), webhook_events=["STEP_COMPLETED", "JOB_COMPLETED"])
        finished_deliveries(wait, job_id, 5)
        seqs = [request.verify(secret_of(api))["seq"] for request in receiver.requests()]

    # Then every request is for the same or a later event than the one before, and each went once it was accepted
    assert len(seqs) == 8
    assert seqs == sorted(seqs)
    assert seqs[:4] == [seqs[0]] * 4 and len(set(seqs)) == 5


def test_a_cancelled_job_delivers_its_cancellation(api, registry, simulator, worker, wait, webhooks_settings):
    simulator.configure(latency={"fast_chat_llm": "3s"})
    with WebhookReceiver() as receiver:
        job_id = create(api, receiver.url())
        wait(lambda: Job.objects.get(pk=job_id).status == "RUNNING", timeout=30, message="the job to run")
        assert api.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
        [request] = wait(receiver.accepted, timeout=30, message="the cancellation's delivery")

    assert request.verify(secret_of(api)) == event_payload(job_id, "JOB_CANCELLED")


# --- The address policy --------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://api.localhost/", "http://10.1.2.3/",
    "http://192.168.0.10/", "http://172.16.5.4/", "http://169.254.169.254/latest/meta-data", "http://[::1]:8080/",
    "http://[fe80::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "https://100.64.0.1/",
])
def test_a_private_address_is_refused_at_create_and_nothing_is_written(api, registry, url):
    response = api.post(
        "/api/v1/jobs", {"feature_name": "business_plan", "input_data": {}, "webhook_url": url}, format="json"
    )

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["success"] is False
    assert body["error"]["code"] == "WEBHOOK_ADDRESS_NOT_ALLOWED"
    assert "CAO_WEBHOOK_ALLOWED_HOSTS" in body["error"]["message"]
    assert body["error"]["details"]["webhook_url"] == "address not allowed"
    assert not Job.objects.exists() and not Delivery.objects.exists()


def test_an_allowed_host_or_network_may_be_private(settings):
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["localhost", "10.0.0.0/8"]

    assert addresses.check_at_create("http://localhost:8000/hook")
    assert addresses.check_at_create("http://10.20.30.40/hook")
    with pytest.raises(addresses.WebhookAddressNotAllowed):
        addresses.check_at_create("http://192.168.1.1/hook")


def test_a_name_is_checked_against_every_address_it_resolves_to(settings):
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = []

    def resolver(host, port, type):
        # A public address and a private one: the private one refuses it all.
        return [(socket.AF_INET, type, 6, "", ("93.184.216.34", port)), (socket.AF_INET, type, 6, "", ("10.0.0.7", port))]

    with pytest.raises(addresses.WebhookAddressNotAllowed) as refused:
        addresses.check_at_create("https://mixed.example/hook", resolver=resolver)
    assert refused.value.details["address"] == "10.0.0.7"
    target = addresses.parse("https://mixed.example/hook")
    with pytest.raises(addresses.WebhookAddressNotAllowed):
        addresses.resolve(target, resolver=resolver)


def outbox_row(api_key, url, *, job=None, seq=1, event_type="JOB_COMPLETED"):
    """A delivery as the outbox writes it, for a job of ``api_key``."""
    now = timezone.now()
    job = job or Job.objects.create(feature_name="business_plan", steps=["prompt_enhancer"], owner=api_key,
                                    webhook_url=url, webhook_events=["JOB_COMPLETED"])
    return Delivery.objects.create(
        job=job, seq=seq, event_type=event_type, payload={"type": event_type, "job_id": str(job.pk), "seq": seq},
        url=url, api_key=api_key, next_attempt_at=now, give_up_at=now + timedelta(hours=24), created_at=now,
    )


def test_a_name_that_resolves_to_a_private_address_is_refused_at_delivery(client_key, settings):
    # Given a delivery to a name that resolves (for real, /etc/hosts) to loopback, which is not allowed
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = []
    with WebhookReceiver() as receiver:
        row = outbox_row(client_key, receiver.url(host="localhost"))

        # When it is delivered
        following = delivery.deliver_next(row.job_id)

        # Then nothing is sent, and it is given up at once: retrying cannot change the policy
        assert receiver.requests() == []
    row.refresh_from_db()
    assert following is None
    assert row.state == DeliveryState.FAILED and "loopback, link-local or private" in row.last_error
    [attempt] = DeliveryAttempt.objects.filter(delivery=row)
    assert attempt.outcome == AttemptOutcome.ADDRESS_REFUSED and attempt.next_attempt_at is None


def test_a_name_that_rebinds_to_a_private_address_after_create_is_refused(client_key, settings):
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = []
    answers = iter(["93.184.216.34", "10.0.0.7"])

    def rebinding(host, port, type):
        return [(socket.AF_INET, type, 6, "", (next(answers), port))]

    url = "http://rebind.example/hook"
    addresses.check_at_create(url, resolver=rebinding)  # public at create
    row = outbox_row(client_key, url)

    delivery.deliver_next(row.job_id, resolver=rebinding)  # private at delivery

    row.refresh_from_db()
    assert row.state == DeliveryState.FAILED
    assert DeliveryAttempt.objects.get(delivery=row).outcome == AttemptOutcome.ADDRESS_REFUSED


def test_delivery_connects_to_the_address_it_checked_not_to_a_second_resolution(client_key, settings):
    # Given a name only this resolver knows, resolving to the (allowed) receiver's address
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    calls = []

    def resolver(host, port, type):
        calls.append(host)
        return [(socket.AF_INET, type, 6, "", ("127.0.0.1", port))]

    with WebhookReceiver() as receiver:
        row = outbox_row(client_key, f"http://receiver.invalid:{receiver.port}/hook?x=1")

        delivery.deliver_next(row.job_id, resolver=resolver)

        # Then the request reached it (the name resolves nowhere else), resolved once, with the URL's Host
        [request] = receiver.requests()
    assert calls == ["receiver.invalid"]
    assert request.headers["host"] == f"receiver.invalid:{receiver.port}"
    assert request.path == "/hook?x=1"
    row.refresh_from_db()
    assert row.state == DeliveryState.DELIVERED


# --- Secrets and rotation --------------------------------------------------------------------------


def test_during_the_grace_period_both_secrets_sign_and_after_it_only_the_new_one(client_key, settings):
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.CAO_WEBHOOK_SECRET_GRACE_S = 3600
    old = client_key.webhook_secret
    rotated = webhook_secret_rotate(api_key_id=client_key.pk)
    new = rotated.webhook_secret
    assert new != old and new.startswith("whsec_") and rotated.previous_webhook_secret == old

    with WebhookReceiver() as receiver:
        first = outbox_row(client_key, receiver.url())
        delivery.deliver_next(first.job_id)
        [during] = receiver.requests()
        # the grace period ends
        ApiKey.objects.filter(pk=client_key.pk).update(previous_webhook_secret_until=timezone.now())
        second = outbox_row(client_key, receiver.url(), job=first.job, seq=2)
        delivery.deliver_next(second.job_id)
        [_, after] = receiver.requests()

    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert during.verify(old) and during.verify(new)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert after.verify(new)
    with pytest.raises(WebhookVerificationError):
        after.verify(old)


def test_the_secret_endpoint_returns_the_callers_own_secret(api, staff_api, client_key, staff_key):
    assert api.get("/api/v1/webhooks/secret").json() == {"secret": client_key.webhook_secret}
    assert staff_api.get("/api/v1/webhooks/secret").json() == {"secret": staff_key.webhook_secret}
    assert client_key.webhook_secret != staff_key.webhook_secret
    webhook_secret_rotate(api_key_id=client_key.pk)
    assert api.get("/api/v1/webhooks/secret").json()["secret"] == ApiKey.objects.get(pk=client_key.pk).webhook_secret


def test_anonymous_clients_have_no_secret_and_cannot_ask_for_a_webhook(client, registry, settings):
    settings.CAO_ALLOW_ANONYMOUS = True
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]

    secret = client.get("/api/v1/webhooks/secret")
    created = client.post(
        "/api/v1/jobs", {"feature_name": "business_plan", "webhook_url": "http://127.0.0.1:9/hook"},
        content_type="application/json",
    )

    assert secret.status_code == 403 and secret.json()["error"]["code"] == "API_KEY_REQUIRED"
    assert created.status_code == 400 and created.json()["error"]["code"] == "WEBHOOK_NEEDS_API_KEY"
    assert not Job.objects.exists()


def test_without_credentials_the_secret_endpoint_answers_401(client):
    response = client.get("/api/v1/webhooks/secret")

    assert response.status_code in (401, 403) and response.json()["success"] is False


def test_every_key_gets_a_secret_of_its_own_in_the_standard_format(db):
    keys = [ApiKey.objects.create_key(name=f"k{i}")[0] for i in range(3)]

    assert len({key.webhook_secret for key in keys}) == 3
    for key in keys:
        Webhook(key.webhook_secret)  # parses as a Standard Webhooks secret
        assert key.webhook_secret.startswith("whsec_")


# --- Bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, detail", [
    ({"webhook_url": "ftp://example.com/hook"}, "webhook_url"),
    ({"webhook_url": "javascript:alert(1)"}, "webhook_url"),
    ({"webhook_url": "example.com/hook"}, "webhook_url"),
    ({"webhook_url": "http://"}, "webhook_url"),
    ({"webhook_url": "http://[::1/hook"}, "webhook_url"),
    ({"webhook_url": "http://example.com:99999/"}, "webhook_url"),
    ({"webhook_url": "http://user:pw@example.com/"}, "webhook_url"),
    ({"webhook_url": "http://exa mple.com/"}, "webhook_url"),
    ({"webhook_url": "http://example.com/" + "a" * 2000}, "webhook_url"),
    ({"webhook_url": ["http://example.com/"]}, "webhook_url"),
    ({"webhook_url": None}, "webhook_url"),
    ({"webhook_url": "http://example.com/\u0000"}, "webhook_url"),
    ({"webhook_url": "http://ex\u00e4mple.com/"}, "webhook_url"),
    ({"webhook_url": "http://example.com/#fragment"}, "webhook_url"),
    ({"webhook_url": "https://example.com/", "webhook_events": ["JOB_EXPLODED"]}, "webhook_events"),
    ({"webhook_url": "https://example.com/", "webhook_events": ["STEP_STARTED"]}, "webhook_events"),
    ({"webhook_url": "https://example.com/", "webhook_events": []}, "webhook_events"),
    ({"webhook_url": "https://example.com/", "webhook_events": "JOB_COMPLETED"}, "webhook_events"),
    ({"webhook_url": "https://example.com/", "webhook_events": [1]}, "webhook_events"),
    ({"webhook_events": ["JOB_COMPLETED"]}, "webhook_events"),
])
def test_bad_webhook_input_is_a_400_in_the_error_shape_and_writes_nothing(api, registry, fields, detail):
    response = api.post(
        "/api/v1/jobs", {"feature_name": "business_plan", "input_data": {}, **fields}, format="json"
    )

    assert response.status_code == 400, response.content
    body = response.json()
    assert body["success"] is False
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] in ("INVALID_WEBHOOK", "INVALID_INPUT")
    assert detail in body["error"]["details"]
    assert not Job.objects.exists() and not Delivery.objects.exists()


def test_a_lone_surrogate_in_webhook_url_is_a_400(api, registry):
    body = '{"feature_name": "business_plan", "input_data": {}, "webhook_url": "http://example.com/\\ud800"}'

    response = api.generic("POST", "/api/v1/jobs", body, content_type="application/json")

    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] in ("INVALID_WEBHOOK", "INVALID_INPUT", "MALFORMED_JSON")
    assert not Job.objects.exists()


# --- The job's representation and the schema -------------------------------------------------------


def test_the_job_shows_its_webhook_and_the_schema_documents_it(api, registry, webhooks_settings):
    job_id = create(api, "http://127.0.0.1:9/hook", webhook_events=["JOB_ERROR"])
    plain = api.post("/api/v1/jobs", {"feature_name": "business_plan", "input_data": {}}, format="json").json()

    detail = api.get(f"/api/v1/jobs/{job_id}").json()
    assert detail["webhook_url"] == "http://127.0.0.1:9/hook" and detail["webhook_events"] == ["JOB_ERROR"]
    other = api.get(f"/api/v1/jobs/{plain['job_id']}").json()
    assert other["webhook_url"] is None and other["webhook_events"] is None
    listed = {job["job_id"]: job for job in api.get("/api/v1/jobs").json()["results"]}
    assert listed[job_id]["webhook_url"] == "http://127.0.0.1:9/hook"

    schema = api.get("/api/v1/schema", HTTP_ACCEPT="application/json").json()
    schemas = schema["components"]["schemas"]
    create_input = next(s for name, s in schemas.items() if "webhook_url" in s.get("properties", {}) and "feature_name" in s.get("properties", {}) and "input_data" in s["properties"])
    assert "CAO_WEBHOOK_ALLOWED_HOSTS" in create_input["properties"]["webhook_url"]["description"]
    assert "JOB_COMPLETED" in create_input["properties"]["webhook_events"]["description"]
    assert "/api/v1/webhooks/secret" in schema["paths"]


# --- The claim, the retry schedule -----------------------------------------------------------------


def test_two_workers_never_claim_the_same_attempt(client_key):
    row = outbox_row(client_key, "http://127.0.0.1:9/hook")
    now = timezone.now()

    first, _ = delivery._claim_head(row.job_id, now=now)
    second, again = delivery._claim_head(row.job_id, now=now)

    assert first is not None and first.attempts == 1
    assert second is None
    # the second is told to look again once the first one's lease lapses (should its worker die)
    assert again is not None and again.delay_s >= delivery.lease_s()
    # once the lease lapses (its worker died mid-POST) the attempt is claimed again
    third, _ = delivery._claim_head(row.job_id, now=now + timedelta(seconds=delivery.lease_s() + 1))
    assert third is not None and third.attempts == 2


def test_the_retry_schedule_doubles_with_jitter_and_gives_up_after_its_window():
    delays = [retry.backoff_s(attempt, base_s=5, cap_s=3600, rng=lambda: 1.0) for attempt in range(1, 12)]
    assert delays[:4] == [5, 10, 20, 40] and delays[-1] == 3600
    assert retry.backoff_s(3, base_s=5, cap_s=3600, rng=lambda: 0.0) == 10  # jitter: half to all of it
    now = timezone.now()
    assert retry.after_failure(
        attempt=1, now=now, give_up_at=now + timedelta(hours=24), retryable=True, base_s=5, cap_s=3600
    ).at > now
    assert retry.after_failure(
        attempt=1, now=now, give_up_at=now + timedelta(seconds=1), retryable=True, base_s=5, cap_s=3600,
        rng=lambda: 1.0,
    ).gives_up
    assert retry.after_failure(
        attempt=1, now=now, give_up_at=now + timedelta(hours=24), retryable=False, base_s=5, cap_s=3600
    ).gives_up


def test_a_timeout_and_a_refused_connection_are_retried(client_key, settings):
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.CAO_WEBHOOK_TIMEOUT_S = 0.5
    with WebhookReceiver(hold=lambda number: True) as slow:
        row = outbox_row(client_key, slow.url())
        following = delivery.deliver_next(row.job_id)
    row.refresh_from_db()
    assert DeliveryAttempt.objects.get(delivery=row).outcome == AttemptOutcome.TIMEOUT
    assert row.state == DeliveryState.PENDING and following is not None and following.delay_s > 0

    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there
    other = outbox_row(client_key, f"http://127.0.0.1:{port}/hook")
    delivery.deliver_next(other.job_id)
    other.refresh_from_db()
    assert DeliveryAttempt.objects.get(delivery=other).outcome == AttemptOutcome.CONNECTION_ERROR
    assert other.state == DeliveryState.PENDING and other.next_attempt_at > timezone.now()


# --- The README's receiver ----------------------------------------------------------------------------


def readme_receiver():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("A receiver that verifies with the `standardwebhooks` package"):]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_ten_line_receiver_verifies_a_real_delivery(client_key, settings, tmp_path):
    import subprocess
    import sys

    from scripts.private_servers import free_port
    from scripts.testbed import wait_until

    code = readme_receiver()
    assert len(code.strip().splitlines()) <= 10
    port = free_port()
    script = tmp_path / "receiver.py"
    script.write_text(code.replace('"whsec_..."', repr(client_key.webhook_secret)).replace("8080", str(port)))
    receiver = subprocess.Popen([sys.executable, "-u", str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def listening():
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, timeout=20, message="the README's receiver to listen")
        settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
        row = outbox_row(client_key, f"http://127.0.0.1:{port}/cao")

        delivery.deliver_next(row.job_id)

        row.refresh_from_db()
        assert row.state == DeliveryState.DELIVERED and row.last_status_code == 204
    finally:
        receiver.terminate()
        out, _ = receiver.communicate(timeout=10)
    assert f"{row.webhook_id} JOB_COMPLETED {row.job_id}" in out


# --- Maintenance: the row is the truth ----------------------------------------------------------------


def queued_messages(job_id):
    import dramatiq
    from django.conf import settings

    broker = dramatiq.get_broker()
    queue = f"{broker.namespace}:{settings.CAO_WEBHOOK_QUEUE}"
    return [message for message in broker.client.lrange(queue, 0, -1) if str(job_id).encode() in message] + [
        message for message in broker.client.hvals(f"{queue}.msgs") if str(job_id).encode() in message
    ]


def test_maintenance_resends_a_due_delivery_whose_message_was_lost_and_only_that(client_key, settings):
    import dramatiq

    from webhooks.dispatch import QUEUED_MARKER, send_delivery
    from webhooks.services import redispatch_lost

    settings.CAO_REDISPATCH_GRACE_S = 0
    dramatiq.get_broker().flush_all()
    lost = outbox_row(client_key, "http://127.0.0.1:9/lost")
    sent = outbox_row(client_key, "http://127.0.0.1:9/sent")
    send_delivery(sent.job_id)  # its message and marker are in Redis
    later = outbox_row(client_key, "http://127.0.0.1:9/later")
    Delivery.objects.filter(pk=later.pk).update(next_attempt_at=timezone.now() + timedelta(hours=1))

    assert redispatch_lost() == 1

    assert get_marker(QUEUED_MARKER.format(job_id=lost.job_id))
    assert len(queued_messages(lost.job_id)) == 1
    assert len(queued_messages(sent.job_id)) == 1  # not sent twice
    assert queued_messages(later.job_id) == []  # not due: its retry message is the one to wait for
    # after a Redis loss every due delivery is sent again, marker or not
    assert redispatch_lost(after_redis_loss=True) == 2


def test_maintenance_resends_a_delivery_whose_attempt_lease_lapsed(client_key, settings):
    from webhooks.dispatch import send_delivery
    from webhooks.services import redispatch_lost

    settings.CAO_REDISPATCH_GRACE_S = 3600
    row = outbox_row(client_key, "http://127.0.0.1:9/hook")
    send_delivery(row.job_id)  # marked as sent
    claimed, _ = delivery._claim_head(row.job_id, now=timezone.now())
    assert claimed is not None
    assert redispatch_lost() == 0  # a worker holds it

    # the worker died mid-POST: its lease lapses
    Delivery.objects.filter(pk=row.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert redispatch_lost() == 1


def get_marker(key):
    from common.redis import get_redis

    return get_redis().exists(key)


def test_an_https_receiver_is_held_to_its_certificate(client_key, settings, tmp_path):
    import ssl
    import subprocess
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import shutil

    from tests.requirements import require

    require(shutil.which("openssl"), "openssl (Debian's openssl package) makes the test's certificate")
    # Given an https receiver with a self-signed certificate for its name
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["localhost"]
    try:
        row = outbox_row(client_key, f"https://localhost:{server.server_address[1]}/hook")

        # When it is delivered to (connecting to the checked address, verifying TLS against the URL's name)
        delivery.deliver_next(row.job_id)
    finally:
        server.shutdown()
        server.server_close()

    # Then the certificate no CA signed is refused before anything is sent, and retried like any connection error
    row.refresh_from_db()
    attempt = DeliveryAttempt.objects.get(delivery=row)
    assert attempt.outcome == AttemptOutcome.CONNECTION_ERROR and "CERTIFICATE_VERIFY_FAILED" in attempt.error
    assert seen == [] and row.state == DeliveryState.PENDING
