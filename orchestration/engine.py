"""Run one step of a job: claim, call, record.

    claim  (one statement): take a slot of the message's service, then start
           the attempt if the message's step is still current; with no free
           slot, or a message that is not current, read the job first and
           park in the service's line, or drop the message
    call   (no transaction): POST the envelope while the lease is renewed
    record (one conditional statement): store the output and advance, or
           schedule a retry, or fail the job; then release the slot

A conditional statement (``jobs.writes.ConditionalWrite``) applies only if
the job row has not moved since it was read; when it has, or anything is
out of the ordinary, the phase is decided again in a short transaction with
the job row locked. No transaction is ever held across the downstream call.
Messages and hand-offs leave after commit. A message that is not for the
current step under the current token is dropped, so redelivery and
duplicates are safe.
"""

import copy
import dataclasses
import logging
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from common import green, metrics
from common.backends import DATABASE_ERRORS
from common.after_commit import after_commit
from common.logs import bind, log_context, redact
from jobs import selectors as job_selectors
from jobs import state as job_state
from jobs import steps as job_steps
from jobs.outcomes import RecordOutcome, StepDispatch
from jobs.events import publish
from jobs.models import ACTIVE_STATUSES, StepState
from orchestration import errors
from orchestration.errors import failure_from
from jobs.writes import LOCKED, ConditionalWrite
from orchestration.dispatch import release_step, send_after_commit, send_handoffs, send_step
from orchestration.http_client import ServiceClient
from orchestration.messages import handoff_payload, lease_member, step_member
from orchestration.per_process import get_keeper, get_limiter
from orchestration.retry import retry_delay
from services_registry.selectors import service_live

logger = logging.getLogger(__name__)


# The fast path could not decide: decide again under the job's row lock.
_DECIDE_LOCKED = object()
# A claim without reading the job could not decide: read it, then decide.
_READ_FIRST = object()


@dataclass(frozen=True)
class Claim:
    """A started attempt: everything the call and record phases need."""

    step: StepDispatch
    service: object
    attempt: int
    envelope: dict
    # The job's last event seq once STEP_STARTED was written: what a record
    # whose commit was ambiguous republishes from.
    claimed_seq: int = 0
    # The job as the claim wrote it: what the record's conditional write
    # expects to find (None: record under the row lock).
    job: object = field(default=None, repr=False, compare=False)

    @property
    def member(self):
        return step_member(self.step)

    @property
    def idempotency_key(self):
        return f"{self.step.job_id}:{self.step.step_index}:{self.step.service}"



def build_envelope(job, *, attempt, now):
    """The request body of the downstream contract."""
    return {
        "meta": {
            "job_id": str(job.id),
            "step_index": job.current_step_index,
            "service_name": job.current_service,
            "attempt": attempt,
            "timestamp": now.isoformat(),
        },
        "payload": {"params": job.context.get("initial_input", {}), "context": job.context},
    }


class Engine:
    """Executes step messages. Collaborators are injectable for tests."""

    def __init__(self, *, limiter=None, keeper=None, client=None, rng=random.random, sleep=time.sleep):
        self._limiter = limiter
        self._keeper = keeper
        self.client = client or ServiceClient()
        self.rng = rng
        self.sleep = sleep

    @property
    def limiter(self):
        return self._limiter or get_limiter()

    @property
    def keeper(self):
        return self._keeper or get_keeper()

    def run_step(self, job_id, step_index, token, service=None):
        """Handle one step message; returns the Claim when a call was made.

        Once a slot is taken, every way out of the call and record phases
        gives it back: a reply that cannot be stored, or a bug, ends the
        attempt as a typed failure instead of stranding the job and the slot.
        """
        with log_context(job_id=str(job_id), step_index=step_index):
            claim = self.claim(job_id, step_index, token, service)
            if claim is None:
                return None
            # A green worker's connection serves other steps while this call waits.
            green.release_database_connection()
            reply = None
            try:
                with self.keeper.keep(claim.service.name, claim.member, claim.service.lease_ttl_s):
                    reply = self.call(claim)
                    self.record(claim, reply)
            finally:
                self._release(claim, reply)
            return claim

    def call(self, claim):
        """POST the envelope; the ServiceReply, or the StepError that ended the attempt."""
        started = time.perf_counter()
        try:
            reply = self.client.execute(claim.service, envelope=claim.envelope, idempotency_key=claim.idempotency_key)
        except errors.StepError as error:
            reply = error
        except Exception as exc:
            logger.exception("The call to %s failed inside the gateway.", claim.service.name)
            reply = errors.GatewayFault(f"The gateway failed while calling {claim.service.name} ({type(exc).__name__}).")
        metrics.observe_call(claim.service.name, reply, time.perf_counter() - started)
        return reply

    # --- claim -----------------------------------------------------------------

    def claim(self, job_id, step_index, token, service=None):
        """Start the attempt if the message is current and a slot is free.

        A message that names its service is claimed without reading the
        job: the slot is taken, then one statement starts the attempt if the
        step is still the job's current one. Otherwise, and whenever that
        statement does not apply (no free slot, a stale message), the job is
        read without a lock and the claim (or the park) written in one
        conditional statement. Anything out of the ordinary (a stale
        message, a missing service, a row that moved between the read and
        the write) is decided again under the row lock. Taking the slot
        again on a later path is harmless: acquire is idempotent per lease.
        """
        if service is not None:
            claim = self._claim_unread(StepDispatch(job_id, step_index, token, service))
            if claim is not _READ_FIRST:
                return claim
        claim = self._claim_once(job_id, step_index, token, locked=False)
        if claim is _DECIDE_LOCKED:
            claim = self._claim_once(job_id, step_index, token, locked=True, service=service)
        return claim

    def _claim_once(self, job_id, step_index, token, *, locked, service=None):
        granted = attempt = None
        try:
            with transaction.atomic() if locked else nullcontext():
                job = job_state.lock_job(job_id) if locked else job_state.read_job(job_id)
                if job is None or not job_steps.step_is_current(job, step_index=step_index, token=token):
                    if not locked:
                        return _DECIDE_LOCKED
                    self._drop(job, StepDispatch(job_id, step_index, token, service))
                    return None
                service = service_live(job.current_service)
                bind(service=job.current_service)
                if service is None or not service.enabled:
                    if not locked:
                        return _DECIDE_LOCKED
                    self._fail_unavailable(job)
                    return None
                step = job_state.current_step(job)
                acquisition = self._acquire(service, step)
                if acquisition.handoffs:
                    after_commit(send_handoffs, acquisition.handoffs)
                read_seq = job.last_event_seq
                writer = LOCKED if locked else ConditionalWrite(job)
                if not acquisition.granted:
                    job_steps.step_park(job=job, position=acquisition.position, writer=writer)
                    if not writer.execute():
                        return _DECIDE_LOCKED
                    logger.info("Parked: no free slot of %s (position %s).", service.name, acquisition.position)
                    return None
                granted = (step, service)
                parked_since = job.updated_at if job.step_state == StepState.WAITING else None
                attempt = job_steps.step_claim(job=job, max_attempts=service.max_attempts, writer=writer)
                if not writer.execute():
                    # Still granted under this lease: the locked decision
                    # keeps the slot or gives it back.
                    return _DECIDE_LOCKED
        except BaseException as exc:
            started_at = attempt.started_at if attempt is not None else None
            if granted is None or not self._stored_despite(exc, *granted, started_at):
                raise
            # The attempt is ours: push the events its commit would have pushed.
            self._republish(job, after=read_seq)
        bind(attempt=attempt.attempt)
        if parked_since is not None:
            metrics.observe_slot_wait(service.name, (attempt.started_at - parked_since).total_seconds())
        return self._started(job, step, service)

    def _claim_unread(self, step):
        """The claim of a message that names its service; _READ_FIRST when the job must be read to decide."""
        service = service_live(step.service)
        if service is None or not service.enabled:
            return _READ_FIRST
        bind(service=step.service)
        acquisition = self._acquire(service, step)
        if acquisition.handoffs:
            send_handoffs(acquisition.handoffs)
        if not acquisition.granted:
            return _READ_FIRST  # parking needs the job's state: the read path re-acquires (same place) and parks
        claim_write = job_steps.step_claim_unread(step, max_attempts=service.max_attempts)
        try:
            job = claim_write.execute()
        except BaseException as exc:
            if not self._stored_despite(exc, step, service, claim_write.started_at):
                raise
            job = job_state.read_job(step.job_id)
            self._republish(job, after=job.last_event_seq - 1)
        else:
            if job is None:
                # Not the job's claimable step (stale, a duplicate, cancelled):
                # the read path decides, and frees what this took if it must.
                return _READ_FIRST
            publish(str(job.id), [job.started_event])
        bind(attempt=job.step_attempt)
        if getattr(job, "claimed_from", None) == StepState.WAITING:
            metrics.observe_slot_wait(service.name, (claim_write.started_at - job.waiting_since).total_seconds())
        return self._started(job, step, service)

    def _acquire(self, service, step):
        self.keeper.ensure_alive()  # a slot's owner must be known to be alive
        return self.limiter.acquire(
            service.name,
            step_member(step),
            limit=service.concurrency_limit,
            ttl_s=service.lease_ttl_s,
            payload=handoff_payload(step),
            census=lambda: [lease_member(*call) for call in job_selectors.calls_in_flight(service.name)],
            owner=self.keeper.owner,
        )

    def _started(self, job, step, service):
        logger.info("Started the call to %s.", service.name)
        return Claim(
            step=step,
            service=service,
            attempt=job.step_attempt,
            envelope=build_envelope(job, attempt=job.step_attempt, now=job.step_started_at),
            claimed_seq=job.last_event_seq,
            job=job,
        )

    def _stored_despite(self, exc, step, service, started_at):
        """After the claim's write raised ``exc``: whether it was stored all the same; if not, the slot goes back.

        ``started_at`` is the attempt's start the write carried (None when
        it raised before the attempt was built).
        """
        stored = False
        try:
            stored = (
                isinstance(exc, DATABASE_ERRORS)
                and started_at is not None
                and self._claim_went_through(step, started_at, service)
            )
        finally:
            if not stored:
                # The attempt never started: give the slot back at once
                # rather than after lease_ttl_s.
                self._release_quietly(step, service)
        if stored:
            logger.warning("The claim was stored although its commit raised; going on with the call.")
        return stored

    def _claim_went_through(self, step, started_at, service):
        """Whether the claim's write committed although it raised; asks until the database answers.

        The attempt row is unique per token and carries the claim's own
        start time, so finding it (still running) means this claim, not
        another delivery of the message, started it. The slot is renewed
        meanwhile so that it is still held when the answer is yes.
        """
        member = step_member(step)
        retry = DatabaseRetry("checking whether the claim was stored", sleep=self.sleep)
        while True:
            try:
                return job_selectors.attempt_running(step.job_id, token=step.token, started_at=started_at)
            except DATABASE_ERRORS:
                retry.wait_or_raise()
                self.limiter.renew(service.name, member, ttl_s=service.lease_ttl_s)

    def _republish(self, job, *, after):
        try:
            publish(str(job.id), job_selectors.job_events(job.id, after=after))
        except DATABASE_ERRORS:
            # Stored all the same: subscribers get them on their next replay.
            logger.warning("Could not read back the events to push them.", exc_info=True)

    def _drop(self, job, message):
        """Drop a stale message (``StepDispatch``; its service may be unknown), freeing what it may hold."""
        logger.info(
            "Dropped a stale step message (token %s; job %s).",
            message.token,
            "missing" if job is None else f"{job.status}, step {job.current_step_index} token {job.step_token}",
        )
        if job is None:
            stale = message if message.service else None
        elif (job.current_step_index, job.step_token, job.step_state) == (message.step_index, message.token, StepState.RUNNING):
            stale = None  # a duplicate of the running attempt: its lease is that attempt's
        elif message.step_index < job.total_steps:
            stale = dataclasses.replace(message, service=job.steps[message.step_index])
        else:
            stale = None
        if stale is not None:
            # A stale message may still own a slot, a reservation or a place
            # in line (taken by its own claim, or before the job was
            # cancelled while parked): free it.
            after_commit(release_step, stale)

    def _fail_unavailable(self, job):
        error = errors.ServiceUnavailable(
            f"Service {job.current_service} is missing or disabled in the registry; "
            "enable it, then resume the job."
        )
        logger.warning("Failing the job: %s", error.message)
        job_steps.job_fail(job=job, failure=failure_from(error))

    # --- record ----------------------------------------------------------------

    def record(self, claim, reply):
        """Store the attempt's result; retries the database until it answers.

        The first try writes it in one conditional statement against the
        job as the claim left it; when the job moved meanwhile (cancelled,
        or its attempt presumed lost), and on every later try, it is decided
        under the row lock. A reply the database refuses (or any other error
        while storing it) is recorded instead as the attempt's failure,
        MALFORMED_RESPONSE.
        """
        retry = DatabaseRetry("recording the result", sleep=self.sleep)
        fast = claim.job is not None
        while True:
            try:
                if fast:
                    outcome = self._record_fast(claim, reply)
                    if outcome is not None:
                        return outcome
                return self._record_locked(claim, reply)
            except DATABASE_ERRORS:
                # The result is only in memory: keep trying (the lease is
                # still being renewed) instead of losing the call's output.
                # A write that failed on the wire may have happened anyway:
                # the locked try finds out (see _record_locked).
                fast = False
                retry.wait_or_raise()
            except Exception as exc:
                fast = False
                if isinstance(reply, errors.StepError):
                    raise  # even the failure cannot be stored: maintenance recovers the step
                logger.warning("The reply of %s could not be stored; recording a failure.", claim.service.name, exc_info=True)
                reply = errors.MalformedResponse(
                    f"{claim.service.name}'s reply could not be stored ({type(exc).__name__}: "
                    f"{redact(str(exc).strip().splitlines()[0])[:200] if str(exc).strip() else 'no detail'})."
                )

    def _record_fast(self, claim, reply):
        """The outcome, written in one statement; None when the job moved since the claim."""
        job = copy.copy(claim.job)
        job.context = dict(job.context)
        writer = ConditionalWrite(job)
        outcome = self._apply_result(job, claim, reply, writer)
        if outcome.accepted and writer.execute():
            return outcome
        return None

    def _record_locked(self, claim, reply):
        with transaction.atomic():
            job = job_state.lock_job(claim.step.job_id)
            if job is None:
                return None
            outcome = self._apply_result(job, claim, reply, LOCKED)
            if not outcome.accepted:
                if self._recorded_before(job, claim):
                    return self._finish_ambiguous_commit(job, claim)
                logger.warning("Discarded the result: the step moved on while it ran.")
            return outcome

    def _apply_result(self, job, claim, reply, writer):
        """The state change the reply leads to, handed to ``writer`` with what follows its commit."""
        if isinstance(reply, errors.StepError):
            service = service_live(claim.service.name) or claim.service
            delay = retry_delay(
                attempt=claim.attempt,
                max_attempts=service.max_attempts,
                retryable=reply.retryable,
                retry_after_s=reply.retry_after_s,
                base_s=settings.CAO_RETRY_BASE_DELAY_S,
                cap_s=settings.CAO_RETRY_MAX_DELAY_S,
                rng=self.rng,
            )
            outcome = job_steps.step_fail(
                job=job, token=claim.step.token, failure=failure_from(reply), retry_delay_s=delay, writer=writer
            )
            if outcome.accepted:
                writer.after_commit(_log_failure, reply, delay)
        else:
            outcome = job_steps.step_succeed(
                job=job,
                token=claim.step.token,
                data=reply.data,
                metrics=reply.metrics,
                http_status=reply.status_code,
                writer=writer,
            )
            if outcome.accepted:
                writer.after_commit(_log_completed)
        if outcome.dispatch:
            # The next step's message leaves first: its worker starts while
            # this one pushes the events and logs.
            writer.after_commit_first(send_step, outcome.dispatch)
        return outcome

    # --- release ---------------------------------------------------------------

    def _recorded_before(self, job, claim):
        """Whether an earlier try of this record committed although its commit raised."""
        return job_selectors.attempt_recorded(job.id, token=claim.step.token)

    def _finish_ambiguous_commit(self, job, claim):
        # The commit went through but its after-commit work never ran: send
        # the next step's message (still ours if its token is the next one)
        # and push the events, instead of leaving both to maintenance.
        logger.warning("The result was stored by an earlier try whose commit raised; finishing its work.")
        dispatch = None
        if job.status in ACTIVE_STATUSES and job.step_state == StepState.QUEUED and job.step_token == claim.step.token + 1:
            due_in_s = (job.step_due_at - timezone.now()).total_seconds() if job.step_due_at else 0.0
            dispatch = job_state.current_step(job, delay_s=max(0.0, due_in_s))
            send_after_commit(dispatch)
        after_commit(publish, str(job.id), job_selectors.job_events(job.id, after=claim.claimed_seq))
        return RecordOutcome(accepted=True, dispatch=dispatch)

    # --- release ---------------------------------------------------------------

    def _release(self, claim, reply=None):
        if isinstance(reply, errors.DownstreamTimeout):
            self._hold_after_timeout(claim)
        else:
            self._release_quietly(claim.step, claim.service)

    def _hold_after_timeout(self, claim):
        # A service that timed out may still be working on the request:
        # freeing its slot now would let a retry (or another job) push it
        # past its limit. The slot stays held for one more timeout period,
        # then expires by itself and goes to the next waiter.
        hold_s = claim.service.effective_timeout_s
        try:
            self.limiter.renew(claim.service.name, claim.member, ttl_s=hold_s)
            logger.info("Keeping the slot of %s for %.1f s after the timeout.", claim.service.name, hold_s)
        except Exception:
            logger.warning("Could not extend the slot after a timeout; it expires by itself.", exc_info=True)

    def _release_quietly(self, step, service):
        try:
            release_step(step, limit=(service_live(service.name) or service).concurrency_limit)
        except Exception:
            # The lease expires after lease_ttl_s; nothing else is lost.
            logger.warning(
                "Could not release the slot of job_id=%s step_index=%s on %s; it expires by itself.",
                step.job_id, step.step_index, step.service, exc_info=True,
            )


class DatabaseRetry:
    """Backoff while the database is unavailable, up to CAO_RECORD_RETRY_SECONDS.

    For work whose only copy is in memory (a call's result, a claim that may
    have been stored): call ``wait_or_raise`` in the ``except`` of each try.
    """

    def __init__(self, doing, *, sleep=time.sleep):
        self.doing = doing
        self.sleep = sleep
        self.deadline = time.monotonic() + settings.CAO_RECORD_RETRY_SECONDS
        self.delay = 0.2

    def wait_or_raise(self):
        if time.monotonic() >= self.deadline:
            logger.error("Giving up %s: database unavailable.", self.doing)
            raise
        logger.warning("Database unavailable while %s; retrying in %.1f s.", self.doing, self.delay, exc_info=True)
        close_old_connections()
        self.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)


def _log_completed():
    logger.info("Completed.")


def _log_failure(error, delay):
    if delay is None:
        logger.warning(
            "Step failed: %s (%s, %s); the job is FAILED.",
            error.code, error.message, "retryable" if error.retryable else "not retryable",
        )
    else:
        logger.info("Step failed: %s (%s); retrying in %.2f s.", error.code, error.message, delay)
