"""The engine when its own database misbehaves: a commit that went through but raised.

Real PostgreSQL, Redis, broker and simulator. The fault is injected at the
one place it cannot be provoked for real on demand: the commit reports a
broken connection after PostgreSQL has committed (as when the connection
drops before the acknowledgement arrives).
"""


import dramatiq
import pytest
from django.db import OperationalError, connection

from jobs.models import Job, JobStatus, StepAttempt, StepState
from jobs.writes import ConditionalWrite, UnreadClaim
from orchestration.commands import submit_job
from orchestration.engine import Engine
from tests.live_subscriber import LiveSubscriber
from orchestration.per_process import get_limiter

pytestmark = pytest.mark.django_db(transaction=True)


def queued(queue):
    broker = dramatiq.get_broker()
    return broker.client.llen(f"{broker.namespace}:{queue}")


@pytest.fixture
def write_that_raises_after_it_went_through(monkeypatch):
    """Make the n-th durable write of this thread's connection go through, then raise OperationalError.

    A durable write is a commit, or a writing statement run outside a
    transaction (it commits by itself, as the engine's conditional writes do).
    """
    count = [0]
    armed = [None]

    def went_through():
        count[0] += 1
        if count[0] == armed[0]:
            raise OperationalError("server closed the connection unexpectedly")

    real_commit = connection._commit

    def commit():
        real_commit()
        went_through()

    def statement(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not connection.in_atomic_block and not sql.lstrip().upper().startswith("SELECT"):
            went_through()
        return result

    def arm(n):
        count[0], armed[0] = 0, n
        return count

    monkeypatch.setattr(connection, "_commit", commit)
    with connection.execute_wrapper(statement):
        yield arm


def test_an_ambiguous_commit_of_a_result_still_sends_the_next_step_and_pushes_the_events(
    registry, simulator, write_that_raises_after_it_went_through
):
    # Given a job whose first step runs, and a subscriber to its events
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    with LiveSubscriber(job.pk) as subscriber:
        assert queued("medium") == 0

        # When the write that records the result raises although it went through
        # (write 1 claims the step, write 2 records its result)
        writes = write_that_raises_after_it_went_through(2)
        Engine(sleep=lambda seconds: None).run_step(job.pk, 0, job.step_token)

        # Then the result is stored once, and the next step's message went out at once
        assert writes[0] >= 2
        job.refresh_from_db()
        assert (job.status, job.current_step_index, job.step_state, job.step_token) == (
            JobStatus.RUNNING, 1, StepState.QUEUED, 2,
        )
        assert "step_0_prompt_enhancer" in job.context
        assert queued("medium") == 1
        # ... and the events of the attempt were pushed to live subscribers
        assert subscriber.seqs(until={1, 2}) >= {1, 2}
    assert Job.objects.get(pk=job.pk).last_event_seq == 2


# The claim of a message naming its service (one statement, the job not
# read), or of one that does not (read first, then a conditional statement).
PATHS = pytest.mark.parametrize("service", ["prompt_enhancer", None], ids=["named", "read-first"])


@PATHS
def test_an_ambiguous_commit_of_a_claim_goes_on_with_the_call(
    registry, simulator, write_that_raises_after_it_went_through, service
):
    # Given a job whose first step's message arrives, and a subscriber to its events
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    with LiveSubscriber(job.pk) as subscriber:
        # When the write that claims the step raises although it went through
        writes = write_that_raises_after_it_went_through(1)
        claim = Engine(sleep=lambda seconds: None).run_step(job.pk, 0, job.step_token, service)

        # Then the worker finds its claim stored and makes the call, once, instead
        # of leaving a running step that nobody runs
        assert claim is not None and writes[0] >= 2
        assert simulator.stats("prompt_enhancer")["calls"] == 1
        job.refresh_from_db()
        assert (job.current_step_index, job.step_state, job.step_token) == (1, StepState.QUEUED, 2)
        assert "step_0_prompt_enhancer" in job.context
        assert list(StepAttempt.objects.filter(job=job).values_list("outcome", flat=True)) == ["SUCCEEDED"]
        # ... the STEP_STARTED its commit would have pushed reaches live subscribers
        assert subscriber.seqs(until={1, 2}) >= {1, 2}
    # ... and the slot is given back after the call
    assert get_limiter().occupancy("prompt_enhancer").in_use == 0


def test_an_ambiguous_commit_of_a_claim_under_the_row_lock_goes_on_with_the_call(
    registry, simulator, write_that_raises_after_it_went_through, monkeypatch
):
    # Given a job whose row moves between the fast path's read and write, so
    # the claim is decided under the row lock
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    real_execute = ConditionalWrite.execute
    moved = []

    def row_moved_once(self):
        if not moved:
            moved.append(True)
            return False
        return real_execute(self)

    monkeypatch.setattr(ConditionalWrite, "execute", row_moved_once)

    # When that transaction's commit raises although it went through
    write_that_raises_after_it_went_through(1)
    Engine(sleep=lambda seconds: None).run_step(job.pk, 0, job.step_token)

    # Then the call is made once and its result stored
    assert moved and simulator.stats("prompt_enhancer")["calls"] == 1
    job.refresh_from_db()
    assert (job.current_step_index, job.step_state, job.step_token) == (1, StepState.QUEUED, 2)
    assert get_limiter().occupancy("prompt_enhancer").in_use == 0


@PATHS
def test_a_claim_whose_write_never_happened_gives_its_slot_back_and_raises_for_a_retry(
    registry, simulator, monkeypatch, service
):
    # Given a job whose first step's message arrives
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})

    # When the claim's write fails on the wire before PostgreSQL ran it
    def refused(self):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(UnreadClaim if service else ConditionalWrite, "execute", refused)
    with pytest.raises(OperationalError):
        Engine(sleep=lambda seconds: None).run_step(job.pk, 0, job.step_token, service)

    # Then nothing started: no call, the step still queued under its token
    # (the message's retry claims it), and the slot free for others
    assert simulator.stats("prompt_enhancer")["calls"] == 0
    job.refresh_from_db()
    assert (job.current_step_index, job.step_state, job.step_token) == (0, StepState.QUEUED, 1)
    assert not StepAttempt.objects.filter(job=job).exists()
    assert get_limiter().occupancy("prompt_enhancer").in_use == 0


def test_a_late_result_under_a_superseded_token_is_discarded(registry, simulator):
    # Given a call in flight, during which the scheduler presumes its worker
    # dead: the attempt is recorded LOST and the step re-sent under token 2
    from django.db import transaction

    from jobs.models import StepAttempt
    from orchestration.http_client import ServiceClient
    from orchestration.per_process import get_limiter
    from orchestration.maintenance import mark_attempt_lost
    from services_registry.selectors import service_live

    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})

    class PresumedDeadMidCall(ServiceClient):
        def execute(self, service, *, envelope, idempotency_key, timeout_s=None):
            with transaction.atomic():
                locked = Job.objects.select_for_update().get(pk=job.pk)
                mark_attempt_lost(locked, service_live("prompt_enhancer"))
            return super().execute(service, envelope=envelope, idempotency_key=idempotency_key)

    # When the old attempt's result arrives after all
    claim = Engine(client=PresumedDeadMidCall()).run_step(job.pk, 0, job.step_token)

    # Then it is discarded: no output, the step still waits for token 2, the old attempt stays LOST
    job.refresh_from_db()
    assert simulator.stats("prompt_enhancer")["calls"] == 1  # the call itself did happen
    assert "step_0_prompt_enhancer" not in job.context
    assert (job.current_step_index, job.step_state, job.step_token) == (0, StepState.QUEUED, 2)
    assert StepAttempt.objects.get(job=job, token=1).outcome == "LOST"
    assert not StepAttempt.objects.filter(job=job, outcome="SUCCEEDED").exists()
    # ... and the superseded attempt's slot is given back
    assert get_limiter().locate("prompt_enhancer", claim.member) is None


def test_a_copy_of_a_running_steps_message_leaves_the_slot_to_the_process_that_runs_the_call(registry, simulator):
    from orchestration.lease_keeper import LeaseKeeper
    from orchestration.liveness import ProcessHeartbeat, ProcessIdentity
    from orchestration.messages import step_member
    from orchestration.per_process import get_liveness

    # Given a step whose call this process runs
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    running = Engine().claim(job.pk, 0, job.step_token, "prompt_enhancer")
    member = step_member(running.step)
    limiter = get_limiter()

    def owner():
        value = limiter.client.hget(limiter.keys("prompt_enhancer")[6], member)
        return value.decode() if isinstance(value, bytes) else value

    # When a copy of its message reaches another process (a redelivery), whose claim takes the slot first
    identity = ProcessIdentity.current()
    heartbeat = ProcessHeartbeat(get_liveness(), identity, period_s=1.0, dead_after_s=5.0)
    other = LeaseKeeper(limiter, autostart=False, heartbeat=heartbeat)
    try:
        assert Engine(keeper=other).run_step(job.pk, 0, job.step_token, "prompt_enhancer") is None

        # Then that process is not left as the owner of the running call's slot,
        # so its death could not free a slot whose call is in flight
        assert owner() != identity.id
        released, _ = limiter.reclaim("prompt_enhancer", [identity.id], limit=4)
        assert released == ()
        assert member in [holder.member for holder in limiter.occupancy("prompt_enhancer").holders]
        assert simulator.stats("prompt_enhancer")["calls"] == 0
    finally:
        get_liveness().retire(identity)
