"""The engine's fast path: each transition in one statement, applied only if the job row has not moved.

Real PostgreSQL, Redis and simulator. The races are provoked for real: the
competing change (a cancel, the winning duplicate) runs in the window
between the fast path's read and its write.
"""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from jobs import state as job_state
from jobs import steps as job_steps
from jobs.models import AttemptOutcome, Job, JobEvent, JobStatus, StepAttempt, StepState
from jobs.outcomes import StepDispatch
from jobs.writes import ConditionalWrite
from orchestration.commands import cancel_job, submit_job
from orchestration.engine import Engine
from orchestration.messages import lease_member
from orchestration.per_process import get_limiter

pytestmark = pytest.mark.django_db(transaction=True)


def events_of(job_id):
    return list(JobEvent.objects.filter(job_id=job_id).order_by("seq").values_list("seq", "type"))


def test_a_transition_is_written_in_one_statement_with_its_attempt_and_event(registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    read = job_state.read_job(job.pk)
    writer = ConditionalWrite(read)
    ran = []
    job_steps.step_claim(job=read, max_attempts=5, writer=writer)
    writer.after_commit(ran.append, "effect")
    assert ran == [] and not StepAttempt.objects.filter(job=job).exists()  # nothing before execute

    with CaptureQueriesContext(connection) as queries:
        assert writer.execute() is True

    assert len(queries.captured_queries) == 1
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.step_state, stored.step_attempt, stored.last_event_seq) == (
        JobStatus.RUNNING, StepState.RUNNING, 1, 1,
    )
    assert stored.updated_at == read.updated_at  # the in-memory job is what was written
    attempt = StepAttempt.objects.get(job=job)
    assert (attempt.token, attempt.attempt, attempt.outcome, attempt.service) == (
        1, 1, AttemptOutcome.RUNNING, "prompt_enhancer",
    )
    assert events_of(job.pk) == [(1, "STEP_STARTED")]
    assert ran == ["effect"]


def test_a_transition_whose_row_moved_since_the_read_writes_nothing_and_runs_no_effect(registry):
    # Given the job read for a claim, then cancelled before the claim is written
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    read = job_state.read_job(job.pk)
    cancel_job(job_id=job.pk, is_staff=True)
    writer = ConditionalWrite(read)
    ran = []
    job_steps.step_claim(job=read, max_attempts=5, writer=writer)
    writer.after_commit(ran.append, "effect")

    # When the claim is written, Then nothing of it is: no attempt, no event, no effect
    assert writer.execute() is False
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.step_state, stored.step_attempt) == (JobStatus.CANCELLED, StepState.IDLE, 0)
    assert not StepAttempt.objects.filter(job=job).exists()
    assert events_of(job.pk) == [(1, "JOB_CANCELLED")]
    assert ran == []


def test_effects_run_after_the_write_in_the_order_they_were_registered(registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    read = job_state.read_job(job.pk)
    writer = ConditionalWrite(read)
    ran = []
    job_steps.step_claim(job=read, max_attempts=5, writer=writer)  # registers the events' push
    writer.after_commit(lambda: ran.append(("log", StepAttempt.objects.filter(job=job).count())))
    writer.after_commit(ran.append, "metrics")
    assert ran == []

    assert writer.execute() is True
    assert ran == [("log", 1), "metrics"]  # the attempt was written when the first effect ran


@pytest.mark.parametrize("column", ["step_token", "step_state", "status", "last_event_seq"])
def test_any_guarded_column_that_moved_stops_the_write(registry, column):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    read = job_state.read_job(job.pk)
    moved = {"step_token": 7, "step_state": StepState.WAITING, "status": JobStatus.RUNNING, "last_event_seq": 3}
    Job.objects.filter(pk=job.pk).update(**{column: moved[column]})
    writer = ConditionalWrite(read)
    job_steps.step_claim(job=read, max_attempts=5, writer=writer)

    assert writer.execute() is False
    assert not StepAttempt.objects.filter(job=job).exists()
    assert getattr(Job.objects.get(pk=job.pk), column) == moved[column]


def test_a_value_too_long_for_its_column_fails_the_statement_instead_of_being_cut(registry):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    read = job_state.read_job(job.pk)
    writer = ConditionalWrite(read)
    attempt = job_steps.step_claim(job=read, max_attempts=5, writer=writer)
    attempt.service = "x" * 65  # the column is varchar(64)

    with pytest.raises(Exception, match="too long"):
        writer.execute()
    assert not StepAttempt.objects.filter(job=job).exists()
    assert Job.objects.get(pk=job.pk).step_state == StepState.QUEUED


class RacingLimiter:
    """The real limiter; right after the slot is taken, ``race()`` runs (the competing change)."""

    def __init__(self, race):
        self.real = get_limiter()
        self.race = race
        self.raced = False

    def acquire(self, service, member, **options):
        acquisition = self.real.acquire(service, member, **options)
        if not self.raced:
            self.raced = True
            self.race()
        return acquisition

    def __getattr__(self, name):
        return getattr(self.real, name)


# A step message names its service (the claim takes the slot, then writes
# without reading the job), or, as sent before it did, does not (the claim
# reads the job first).
PATHS = pytest.mark.parametrize("service", ["prompt_enhancer", None], ids=["named", "read-first"])


@PATHS
def test_a_cancel_between_taking_the_slot_and_writing_the_claim_gives_the_slot_back(registry, simulator, service):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    limiter = RacingLimiter(lambda: cancel_job(job_id=job.pk, is_staff=True))

    claim = Engine(limiter=limiter).run_step(job.pk, 0, 1, service)

    assert claim is None and limiter.raced
    assert simulator.stats("prompt_enhancer")["calls"] == 0
    assert get_limiter().locate("prompt_enhancer", lease_member(job.pk, 0, 1)) is None
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELLED
    assert not StepAttempt.objects.filter(job=job).exists()
    assert events_of(job.pk) == [(1, "JOB_CANCELLED")]


@PATHS
def test_a_duplicate_that_loses_the_claim_race_leaves_the_winners_slot_and_attempt_alone(registry, simulator, service):
    # Given two deliveries of one step message: the winner claims the step
    # while the duplicate sits between taking the (same) slot and writing its claim
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    winner = Engine()
    claims = []
    limiter = RacingLimiter(lambda: claims.append(winner.claim(job.pk, 0, 1)))

    # When the duplicate goes on
    duplicate = Engine(limiter=limiter).run_step(job.pk, 0, 1, service)

    # Then it neither calls nor releases: the winner's attempt runs, holding the slot
    assert duplicate is None and claims[0] is not None
    assert simulator.stats("prompt_enhancer")["calls"] == 0
    member = lease_member(job.pk, 0, 1)
    assert get_limiter().locate("prompt_enhancer", member) == "holder"
    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.step_state, stored.step_attempt) == (JobStatus.RUNNING, StepState.RUNNING, 1)
    assert StepAttempt.objects.filter(job=job).count() == 1
    assert events_of(job.pk) == [(1, "STEP_STARTED")]

    # ... and the winner's result is recorded by its own fast path
    reply = winner.call(claims[0])
    winner.record(claims[0], reply)
    stored.refresh_from_db()
    assert (stored.current_step_index, stored.step_state, stored.step_token) == (1, StepState.QUEUED, 2)
    assert events_of(job.pk) == [(1, "STEP_STARTED"), (2, "STEP_COMPLETED")]


def test_a_result_whose_job_was_cancelled_during_the_call_is_recorded_under_the_lock(registry, simulator):
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    engine = Engine()
    claim = engine.claim(job.pk, 0, 1)
    reply = engine.call(claim)
    cancel_job(job_id=job.pk, is_staff=True)

    engine.record(claim, reply)

    stored = Job.objects.get(pk=job.pk)
    assert (stored.status, stored.step_state) == (JobStatus.CANCELLED, StepState.IDLE)
    assert "step_0_prompt_enhancer" in stored.context  # the output of a call that ran is kept
    assert StepAttempt.objects.get(job=job).outcome == AttemptOutcome.SUCCEEDED
    assert events_of(job.pk) == [(1, "STEP_STARTED"), (2, "JOB_CANCELLED"), (3, "STEP_COMPLETED")]


def test_a_claim_whose_row_moved_but_whose_step_is_still_current_claims_under_the_lock(registry, simulator):
    # Given a step that another delivery parks (QUEUED -> WAITING, one event)
    # between this delivery's read and its write
    from django.db import transaction

    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})

    def parked_by_another_delivery():
        with transaction.atomic():
            job_steps.step_park(job=job_state.lock_job(job.pk), position=0)

    limiter = RacingLimiter(parked_by_another_delivery)

    # When this delivery goes on with the slot it took
    claim = Engine(limiter=limiter).run_step(job.pk, 0, 1)

    # Then the locked decision still claims and runs the step, once
    assert claim is not None and limiter.raced
    assert simulator.stats("prompt_enhancer")["calls"] == 1
    stored = Job.objects.get(pk=job.pk)
    assert (stored.current_step_index, stored.step_state, stored.step_token) == (1, StepState.QUEUED, 2)
    assert events_of(job.pk) == [(1, "WAITING_FOR_SLOT"), (2, "STEP_STARTED"), (3, "STEP_COMPLETED")]
    assert get_limiter().locate("prompt_enhancer", lease_member(job.pk, 0, 1)) is None


# --- A claim named in the message, written without reading the job -----------------


def _run_first_step(job):
    engine = Engine()
    engine.record(claim := engine.claim(job.pk, 0, 1), engine.call(claim))


def _park_first_step(job):
    from django.db import transaction

    with transaction.atomic():
        job_steps.step_park(job=job_state.lock_job(job.pk), position=0)


CLAIMABLE = {
    "the first step of a pending job": (None, 0, 1),
    "a later step of a running job": (_run_first_step, 1, 2),
    "a step waiting for a slot": (_park_first_step, 0, 1),
}


def _written(job_id):
    """What a claim left in the database, without what differs between two jobs (ids, clocks)."""
    job = Job.objects.get(pk=job_id)
    attempts = [
        (*row, finished is None, duration is None)
        for *row, finished, duration in StepAttempt.objects.filter(job_id=job_id).order_by("token").values_list(
            "step_index", "service", "attempt", "token", "outcome", "http_status", "error_code", "error_message",
            "finished_at", "duration_ms",
        )
    ]
    events = [
        {key: value for key, value in payload.items() if key not in ("job_id", "ts")}
        for payload in JobEvent.objects.filter(job_id=job_id).order_by("seq").values_list("payload", flat=True)
    ]
    state = (job.status, job.current_step_index, job.step_state, job.step_token, job.step_attempt, job.last_event_seq)
    return state, attempts, events


@pytest.mark.parametrize("case", CLAIMABLE)
def test_a_claim_named_in_the_message_writes_exactly_what_the_read_path_writes(registry, simulator, settings, case):
    settings.CAO_REGISTRY_CACHE_S = 60  # as in production: service rows are cached briefly
    # Given two jobs in the same state
    prepare, step_index, token = CLAIMABLE[case]
    read_first, named = (submit_job(feature_name="business_plan", input_data={"topic": "tea"})[0] for _ in range(2))
    for job in (read_first, named) if prepare else ():
        prepare(job)
    service = Job.objects.get(pk=named.pk).steps[step_index]
    engine = Engine()

    # When one is claimed after reading it, the other in one statement
    by_read = engine.claim(read_first.pk, step_index, token)
    with CaptureQueriesContext(connection) as queries:
        by_name = engine.claim(named.pk, step_index, token, service)

    # Then the second took one statement and wrote the same rows and events
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["WITH"]
    assert _written(named.pk) == _written(read_first.pk)
    assert _written(named.pk)[0][2] == StepState.RUNNING
    stored = Job.objects.get(pk=named.pk)
    assert stored.step_started_at == stored.last_progress_at == StepAttempt.objects.get(job=named, token=token).started_at
    # ... and hands the call and record phases the same claim
    def handed_on(claim):
        meta = {key: value for key, value in claim.envelope["meta"].items() if key not in ("job_id", "timestamp")}
        payload = claim.envelope["payload"]
        return claim.attempt, claim.claimed_seq, claim.step.service, meta, payload["params"], sorted(payload["context"])

    assert handed_on(by_name) == handed_on(by_read)
    assert by_name.envelope["payload"]["context"] == Job.objects.get(pk=named.pk).context
    assert by_name.job.last_event_seq == by_name.claimed_seq and by_name.job.step_state == StepState.RUNNING


def _cancel(job):
    cancel_job(job_id=job.pk, is_staff=True)


def _start(job):
    Engine().claim(job.pk, 0, 1)


NOT_CLAIMABLE = {
    "a superseded token": (None, 0, 2, "prompt_enhancer"),
    "another step": (None, 1, 1, "fast_chat_llm"),
    "another service than the step's": (None, 0, 1, "email_notifier"),
    "a step already running": (_start, 0, 1, "prompt_enhancer"),
    "a cancelled job": (_cancel, 0, 1, "prompt_enhancer"),
}


@pytest.mark.parametrize("case", NOT_CLAIMABLE)
def test_a_claim_named_in_the_message_writes_nothing_when_the_step_is_not_claimable(registry, simulator, case):
    prepare, step_index, token, service = NOT_CLAIMABLE[case]
    job, _ = submit_job(feature_name="business_plan", input_data={"topic": "tea"})
    if prepare:
        prepare(job)
    before = _written(job.pk)

    claimed = job_steps.step_claim_unread(StepDispatch(job.pk, step_index, token, service), max_attempts=5).execute()

    assert claimed is None
    assert _written(job.pk) == before
