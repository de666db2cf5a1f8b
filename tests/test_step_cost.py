"""What one step costs the gateway: SQL statements and Redis round trips, counted exactly."""

import pytest
import redis
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs.models import Job, JobStatus
from orchestration.commands import submit_job
from orchestration.engine import Engine
from tests.redis_spy import connection_class

pytestmark = pytest.mark.django_db(transaction=True)


class CountingConnection(redis.Connection):
    """A real Redis connection that counts the requests it sends (one per round trip)."""

    sent = 0

    def send_packed_command(self, command, check_health=True):
        CountingConnection.sent += 1
        return super().send_packed_command(command, check_health)


@pytest.fixture
def counted_redis():
    with connection_class(CountingConnection) as counting:
        yield counting


def test_one_step_costs_a_fixed_number_of_statements_and_round_trips(registry, simulator, counted_redis, settings):
    settings.CAO_REGISTRY_CACHE_S = 60  # as in production: service rows are cached briefly
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    engine = Engine()
    # As the step actor calls it: the message names the step's service
    engine.run_step(job.pk, 0, 1, "prompt_enhancer")  # warm caches and connections

    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    counted_redis.sent = 0
    with CaptureQueriesContext(connection) as queries:
        engine.run_step(job.pk, 0, 1, "prompt_enhancer")

    statements = [q["sql"].split()[0] for q in queries.captured_queries]
    print(f"\none middle step: {len(statements)} SQL statements {statements}, {counted_redis.sent} Redis round trips")
    assert Job.objects.get(pk=job.pk).current_step_index == 1
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    # claim: once the slot is taken, one statement starts the attempt if the step is current
    # (updates the job, inserts the attempt and the event) and returns the job
    # record: one statement updates the job if unchanged, finishes the attempt, inserts the event
    assert statements == ["WITH", "WITH"]
    # acquire; then release, enqueue the next step, wake its queue's consumers and mark it as sent
    assert counted_redis.sent == 2


def test_creating_a_job_is_one_statement_and_two_round_trips_to_redis(registry, counted_redis, settings):
    settings.CAO_REGISTRY_CACHE_S = 60  # as in production: the recipe is cached briefly
    submit_job(feature_name="business_plan", input_data={"topic": "tea"})  # warm caches and connections

    counted_redis.sent = 0
    with CaptureQueriesContext(connection) as queries:
        job, created = submit_job(feature_name="business_plan", input_data={"topic": "tea"})

    assert created and Job.objects.get(pk=job.pk).status == JobStatus.PENDING
    # the INSERT commits by itself: no BEGIN, savepoint or COMMIT around it
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["INSERT"]
    # enqueue the first step, wake its queue's consumers and mark it as sent
    assert counted_redis.sent == 1


def test_a_webhook_jobs_last_step_adds_its_outbox_row_to_the_same_statement(
    registry, simulator, counted_redis, settings, client_key
):
    from webhooks.dispatch import QUEUED_MARKER
    from webhooks.models import Delivery

    settings.CAO_REGISTRY_CACHE_S = 60
    settings.CAO_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    engine = Engine()
    warm, _ = submit_job(feature_name="business_plan", input_data={}, owner=client_key)
    for index, service in enumerate(warm.steps):  # caches (each service's row, the key's policy) and connections
        engine.run_step(warm.pk, index, Job.objects.get(pk=warm.pk).step_token, service)
    job, _ = submit_job(
        feature_name="business_plan", input_data={"topic": "tea"}, owner=client_key, webhook_url="http://127.0.0.1:9/h"
    )
    for index, service in enumerate(job.steps[:-1]):
        # the middle steps of a webhook job cost what any job's do: its default events are the last ones
        token = Job.objects.get(pk=job.pk).step_token
        counted_redis.sent = 0
        with CaptureQueriesContext(connection) as queries:
            engine.run_step(job.pk, index, token, service)
        assert [q["sql"].split()[0] for q in queries.captured_queries] == ["WITH", "WITH"]
        assert counted_redis.sent == 2

    last = len(job.steps) - 1
    token = Job.objects.get(pk=job.pk).step_token
    counted_redis.sent = 0
    with CaptureQueriesContext(connection) as queries:
        engine.run_step(job.pk, last, token, job.steps[last])

    statements = [q["sql"] for q in queries.captured_queries]
    print(f"\nlast step of a webhook job: {len(statements)} SQL statements, {counted_redis.sent} Redis round trips")
    assert Job.objects.get(pk=job.pk).status == JobStatus.COMPLETED
    # claim; record: the same one statement, with one more insert (the outbox row) in it
    assert [sql.split()[0] for sql in statements] == ["WITH", "WITH"]
    assert "webhooks_delivery" in statements[1]
    assert Delivery.objects.get(job_id=job.pk).event_type == "JOB_COMPLETED"
    # acquire; release (nothing follows); then the delivery message and its marker: two more
    assert counted_redis.sent == 4
    assert get_redis_marker(QUEUED_MARKER.format(job_id=job.pk))


def get_redis_marker(key):
    from common.redis import get_redis

    return get_redis().exists(key)
