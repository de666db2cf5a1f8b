"""Webhooks with the real stack in separate processes: a pending delivery survives a killed delivery
worker and a Redis restart, because its row in PostgreSQL is the truth."""

import pytest
import requests

from scripts.testbed import wait_until
from tests.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

WEBHOOKS = {
    "CAO_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "CAO_WEBHOOK_RETRY_BASE_S": "0.2",
    "CAO_WEBHOOK_RETRY_MAX_DELAY_S": "1",
    "CAO_WEBHOOK_CONNECT_TIMEOUT_S": "1",
    "CAO_WEBHOOK_TIMEOUT_S": "3",
}


def submit_with_webhook(bed, url):
    response = requests.post(
        f"{bed.base_url}/api/v1/jobs",
        json={"feature_name": "business_plan", "input_data": {"topic": "tea"}, "webhook_url": url},
        headers={"X-API-Key": bed.api_key},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    return response.json()["job_id"]


def secret(bed):
    return requests.get(
        f"{bed.base_url}/api/v1/webhooks/secret", headers={"X-API-Key": bed.api_key}, timeout=10
    ).json()["secret"]


def delivery_row(bed, job_id):
    rows = bed.sql("SELECT state, attempts FROM webhooks_delivery WHERE job_id = %s", [job_id])
    return rows[0] if rows else None


@pytest.mark.timeout(300)
def test_a_pending_delivery_survives_its_worker_killed_and_redis_restarted(testbed, private_redis):
    with WebhookReceiver() as receiver, testbed(env=WEBHOOKS) as bed:
        # Given a delivery pending while its worker is dead: the job completed, its message waits in Redis
        bed.kill("worker_webhooks")
        job_id = submit_with_webhook(bed, receiver.url())
        bed.wait_finished([job_id], timeout=60)
        assert delivery_row(bed, job_id) == ("PENDING", 0)

        # When Redis restarts empty (the message is lost) and the worker comes back
        private_redis.restart()
        bed.start("worker_webhooks")

        # Then maintenance finds the due row without its message and the event is delivered, once
        wait_until(lambda: delivery_row(bed, job_id) == ("DELIVERED", 1), timeout=120, interval=0.2,
                   message=f"the delivery after the restart (logs in {bed.log_dir})")
        [request] = receiver.requests()
        payload = request.verify(secret(bed))
    assert payload["type"] == "JOB_COMPLETED" and payload["job_id"] == job_id


@pytest.mark.timeout(300)
def test_a_worker_killed_mid_delivery_leaves_it_to_be_sent_again_with_the_same_id(testbed):
    # A read timeout long enough for the jobs below to run while the first POST is held (its lease: 37 s)
    env = {**WEBHOOKS, "CAO_WEBHOOK_TIMEOUT_S": "15"}
    # Given a receiver that holds the first request unanswered
    with WebhookReceiver(hold=lambda number: number == 1) as receiver, testbed(env=env) as bed:
        job_id = submit_with_webhook(bed, receiver.url())
        wait_until(lambda: len(receiver.requests()) == 1, timeout=60, message="the first attempt to arrive")
        # (a receiver that does not answer holds a delivery greenlet, never a step worker: jobs go on)
        bed.wait_finished(bed.submit_many(3), timeout=12)

        # When the delivery worker is killed while that POST is in flight, then starts again
        bed.kill("worker_webhooks")
        assert delivery_row(bed, job_id) == ("PENDING", 1)
        bed.start("worker_webhooks")

        # Then, once its lease lapsed, the attempt is made again: same webhook-id, accepted
        wait_until(lambda: delivery_row(bed, job_id) == ("DELIVERED", 2), timeout=120, interval=0.2,
                   message=f"the attempt after the kill (logs in {bed.log_dir})")
        first, second = receiver.requests()
        key = secret(bed)
        attempts = bed.sql(
            "SELECT a.number, a.outcome FROM webhooks_deliveryattempt a JOIN webhooks_delivery d ON d.id = a.delivery_id "
            "WHERE d.job_id = %s ORDER BY a.number", [job_id],
        )
    assert first.webhook_id == second.webhook_id
    assert first.verify(key) == second.verify(key)
    # the killed worker's attempt was never recorded; the second one was
    assert attempts == [(2, "DELIVERED")]
