"""Webhooks in the admin and in /metrics: the delivery log per job and per key, redelivery, the secret and its
rotation."""

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client import generate_latest

from api_keys.models import ApiKey
from common.redis import get_redis
from jobs.models import Job
from orchestration.metrics_view import gateway_registry
from webhooks.dispatch import QUEUED_MARKER
from webhooks.models import AttemptOutcome, Delivery, DeliveryAttempt, DeliveryState

pytestmark = pytest.mark.django_db


@pytest.fixture
def delivered(client_key):
    """A job of client_key with one delivery given up after two failed attempts."""
    now = timezone.now()
    job = Job.objects.create(feature_name="business_plan", steps=["prompt_enhancer"], owner=client_key,
                             webhook_url="https://hooks.example/cao", webhook_events=["JOB_COMPLETED"])
    row = Delivery.objects.create(
        job=job, seq=3, event_type="JOB_COMPLETED", payload={"type": "JOB_COMPLETED"}, url=job.webhook_url,
        api_key=client_key, state=DeliveryState.FAILED, attempts=2, next_attempt_at=now, give_up_at=now,
        created_at=now - timedelta(days=1), finished_at=now, last_status_code=502, last_error="The receiver answered 502.",
    )
    for number in (1, 2):
        DeliveryAttempt.objects.create(
            delivery=row, number=number, started_at=now, latency_ms=40 + number, outcome=AttemptOutcome.HTTP_ERROR,
            status_code=502, error="The receiver answered 502.",
        )
    return row


def test_the_job_page_lists_its_deliveries_and_each_links_to_its_attempts(admin_client, delivered):
    page = admin_client.get(f"/admin/jobs/job/{delivered.job_id}/change/").content.decode()

    assert "webhook deliveries" in page.lower()
    assert delivered.webhook_id in page and f"/admin/webhooks/delivery/{delivered.pk}/change/" in page
    assert "https://hooks.example/cao" in page

    detail = admin_client.get(f"/admin/webhooks/delivery/{delivered.pk}/change/").content.decode()
    assert detail.count("The receiver answered 502.") >= 3  # the row and both attempts
    assert "41 ms" in detail and "42 ms" in detail and "HTTP_ERROR" in detail


def test_the_key_page_shows_its_secret_and_links_its_delivery_log(admin_client, delivered, client_key, staff_key):
    page = admin_client.get(f"/admin/api_keys/apikey/{client_key.pk}/change/").content.decode()
    assert client_key.webhook_secret in page
    assert f"/admin/webhooks/delivery/?api_key__id__exact={client_key.pk}" in page

    mine = admin_client.get(f"/admin/webhooks/delivery/?api_key__id__exact={client_key.pk}").content.decode()
    others = admin_client.get(f"/admin/webhooks/delivery/?api_key__id__exact={staff_key.pk}").content.decode()
    assert delivered.webhook_id in mine and delivered.webhook_id not in others
    assert "The receiver answered 502." in mine and "FAILED" in mine


def test_rotating_a_key_in_the_admin_keeps_the_old_secret_signing_for_the_grace_period(admin_client, client_key, settings):
    settings.CAO_WEBHOOK_SECRET_GRACE_S = 7200
    old = client_key.webhook_secret

    response = admin_client.post(
        "/admin/api_keys/apikey/", {"action": "rotate_webhook_secret", "_selected_action": [client_key.pk]}, follow=True
    )

    assert response.status_code == 200 and "Rotated the signing secret of 1 key" in response.content.decode()
    key = ApiKey.objects.get(pk=client_key.pk)
    assert key.webhook_secret != old and key.previous_webhook_secret == old
    left = (key.previous_webhook_secret_until - timezone.now()).total_seconds()
    assert 7100 < left <= 7200
    page = admin_client.get(f"/admin/api_keys/apikey/{client_key.pk}/change/").content.decode()
    assert key.webhook_secret in page and old in page and "still signing until" in page


def test_redeliver_sends_a_given_up_delivery_again_with_a_fresh_window(
    admin_client, delivered, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/webhooks/delivery/", {"action": "redeliver_selected", "_selected_action": [delivered.pk]},
            follow=True,
        )

    assert "1 delivery queued again" in response.content.decode()
    delivered.refresh_from_db()
    assert delivered.state == DeliveryState.PENDING and delivered.next_attempt_at <= timezone.now()
    assert delivered.give_up_at > timezone.now() + timedelta(hours=23)
    assert delivered.attempts == 2  # the log keeps its attempts; the next one is number 3
    assert get_redis().exists(QUEUED_MARKER.format(job_id=delivered.job_id))


def test_a_viewer_cannot_redeliver(client, django_user_model, delivered):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(codename__in=["view_delivery", "view_job"]))
    client.force_login(user)

    listing = client.get("/admin/webhooks/delivery/").content.decode()
    client.post("/admin/webhooks/delivery/", {"action": "redeliver_selected", "_selected_action": [delivered.pk]})

    assert delivered.webhook_id in listing and "redeliver_selected" not in listing
    delivered.refresh_from_db()
    assert delivered.state == DeliveryState.FAILED


def test_metrics_count_deliveries_and_show_the_oldest_pending_one(delivered):
    from common import metrics

    metrics.WEBHOOK_DELIVERED.inc()
    metrics.WEBHOOK_FAILED.labels("TIMEOUT").inc()
    Delivery.objects.filter(pk=delivered.pk).update(state=DeliveryState.PENDING)

    text = generate_latest(gateway_registry()).decode()

    assert "cao_webhook_delivered_total" in text
    assert 'cao_webhook_attempts_failed_total{outcome="TIMEOUT"}' in text
    assert "cao_webhook_pending 1.0" in text
    oldest = next(line for line in text.splitlines() if line.startswith("cao_webhook_oldest_pending_age_seconds "))
    assert 86000 < float(oldest.split()[1]) < 87000
    assert 'cao_queue_depth{kind="ready",queue="webhooks"}' in text
