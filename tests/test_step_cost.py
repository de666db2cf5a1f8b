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
