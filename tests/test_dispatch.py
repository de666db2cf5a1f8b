"""Sending a step message: one round trip with the sender's pushes and the release of its slot, in that order."""

import dramatiq
import pytest
import redis

from common.redis import get_redis
from jobs.models import EventType, Job, JobEvent, StepState
from orchestration.commands import submit_job
from orchestration.dispatch import dispatched_token, send_step
from orchestration.engine import Engine
from orchestration.messages import lease_member
from orchestration.per_process import get_limiter
from tests.live_subscriber import LiveSubscriber
from tests.redis_spy import connection_class

pytestmark = pytest.mark.django_db(transaction=True)


class RecordingConnection(redis.Connection):
    """A real Redis connection that keeps the commands of every request it sends."""

    requests = []

    def send_packed_command(self, command, check_health=True):
        chunks = command if isinstance(command, list) else [command]
        RecordingConnection.requests.append(b"".join(bytes(chunk) for chunk in chunks))
        return super().send_packed_command(command, check_health)


@pytest.fixture
def recorded_redis():
    RecordingConnection.requests = []
    with connection_class(RecordingConnection) as recording:
        yield recording


def recorded_first_step(job):
    """The claim of ``job``'s first step and the outcome of its recorded call; its next message not sent yet."""
    engine = Engine()
    claim = engine.claim(job.pk, 0, 1, "prompt_enhancer")
    return claim, engine.record(claim, engine.call(claim))


def queued_messages(queue):
    broker = dramatiq.get_broker()
    return broker.client.lrange(f"{broker.namespace}:{queue}", 0, -1)


def test_the_next_message_leaves_in_the_round_trip_that_releases_the_slot_and_after_it(
    registry, simulator, recorded_redis, settings
):
    settings.CAO_REGISTRY_CACHE_S = 60
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    limiter = get_limiter()
    release_sha = limiter.release_call("prompt_enhancer", "x", limit=1).script.sha.encode()
    enqueue_sha = dramatiq.get_broker().scripts["dispatch"].sha.encode()
    recorded_redis.requests = []

    Engine().run_step(job.pk, 0, 1, "prompt_enhancer")

    [request] = [r for r in recorded_redis.requests if enqueue_sha in r]
    assert release_sha in request
    assert request.index(release_sha) < request.index(enqueue_sha)
    assert limiter.locate("prompt_enhancer", lease_member(job.pk, 0, 1)) is None
    assert dispatched_token(job.pk) == 2


def test_a_steps_events_are_published_in_that_round_trip_before_the_release(registry, simulator, recorded_redis, settings):
    settings.CAO_REGISTRY_CACHE_S = 60
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    release_sha = get_limiter().release_call("prompt_enhancer", "x", limit=1).script.sha.encode()
    enqueue_sha = dramatiq.get_broker().scripts["dispatch"].sha.encode()

    with LiveSubscriber(job.pk) as subscriber:
        recorded_redis.requests = []
        Engine().run_step(job.pk, 0, 1, "prompt_enhancer")

        completed = JobEvent.objects.get(job=job, type=EventType.STEP_COMPLETED).seq
        [request] = [r for r in recorded_redis.requests if enqueue_sha in r]
        assert b"PUBLISH" in request
        assert request.index(b"PUBLISH") < request.index(release_sha) < request.index(enqueue_sha)
        assert completed in subscriber.seqs(until={completed})


def test_a_redis_that_lost_its_scripts_still_gets_the_release_the_message_and_its_marker(registry, simulator):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    claim, outcome = recorded_first_step(job)
    queue = registry[outcome.dispatch.service].queue
    before = len(queued_messages(queue))
    get_redis().script_flush()  # what a restarted server knows of them

    (released,) = send_step(
        outcome.dispatch, first=[get_limiter().release_call("prompt_enhancer", claim.member, limit=5)]
    )

    assert get_limiter().handoffs_of(released) == ()  # nobody waited: no hand-off
    assert get_limiter().locate("prompt_enhancer", claim.member) is None
    assert len(queued_messages(queue)) == before + 1
    assert dispatched_token(job.pk) == 2


def test_a_release_that_fails_does_not_keep_the_message_from_leaving(registry, simulator):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    claim, outcome = recorded_first_step(job)
    broken = get_limiter().release_call("prompt_enhancer", claim.member, limit=5)
    broken.args[1] = "not a number"  # the script refuses it

    (released,) = send_step(outcome.dispatch, first=[broken])

    assert isinstance(released, redis.exceptions.ResponseError)
    assert dispatched_token(job.pk) == 2
    assert Job.objects.get(pk=job.pk).step_state == StepState.QUEUED


def test_a_first_message_reaches_a_server_that_lost_its_scripts_once_with_its_marker(registry):
    submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    queue = registry["prompt_enhancer"].queue
    before = len(queued_messages(queue))
    get_redis().script_flush()

    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "oolong"})

    # the enqueue was refused (NOSCRIPT), then loaded and sent again: one message, marked as sent
    assert len(queued_messages(queue)) == before + 1
    assert dispatched_token(job.pk) == 1
