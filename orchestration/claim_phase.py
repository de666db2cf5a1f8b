"""The claim phase of a step: take a slot, then start the attempt if the message is still current.

A message that names its service takes the slot first, then starts the
attempt in one statement that applies only if the step is still the job's
claimable one (``jobs.writes.UnreadClaim``). Without a free slot, or when
that statement does not apply, the job is read and the claim (or the park in
the service's line) written in one conditional statement; anything out of
the ordinary is decided again under the job's row lock. A claim whose write
raised may still have committed: it is checked before the slot is given up.
"""

import dataclasses
import datetime
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone

from common import green, metrics
from common.after_commit import after_commit
from common.backends import DATABASE_ERRORS
from common.logs import bind
from jobs import selectors as job_selectors
from jobs import state as job_state
from jobs import steps as job_steps
from jobs.events import publish
from jobs.models import StepState
from jobs.outcomes import StepDispatch
from jobs.writes import LOCKED, ConditionalWrite
from orchestration import errors
from orchestration.admission import admit_quietly
from orchestration.database_retry import DatabaseRetry
from orchestration.slots import acquire_step, disown_step, release_quietly, release_step, send_handoffs
from orchestration.errors import failure_from
from orchestration.messages import step_member
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
    # The job's deadline (None: none): bounds the call and any retry.
    deadline_at: object = None

    def time_left_s(self, now):
        """Seconds until the job's deadline from ``now`` (None: no deadline); negative once it passed."""
        return None if self.deadline_at is None else (self.deadline_at - now).total_seconds()

    @property
    def member(self):
        return step_member(self.step)

    @property
    def idempotency_key(self):
        return f"{self.step.job_id}:{self.step.step_index}:{self.step.service}"



def _datetime_or_none(unix_s):
    return None if unix_s is None else datetime.datetime.fromtimestamp(unix_s, tz=datetime.timezone.utc)


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


class ClaimPhase:
    """``Engine.claim`` and its paths; uses the engine's ``limiter``, ``keeper`` and ``sleep``."""

    def claim(self, job_id, step_index, token, service=None, *, tenant="", priority=0):
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
            claim = self._claim_unread(
                StepDispatch(job_id, step_index, token, service, tenant=tenant, priority=priority)
            )
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
                if job_steps.past_deadline(job, timezone.now()):
                    if not locked:
                        return _DECIDE_LOCKED
                    self._fail_past_deadline(job, step)
                    return None
                acquisition = self._acquire(service, step)
                if acquisition.handoffs:
                    after_commit(send_handoffs, acquisition.handoffs)
                read_seq = job.last_event_seq
                writer = LOCKED if locked else ConditionalWrite(job)
                if not acquisition.granted:
                    job_steps.step_park(
                        job=job, position=acquisition.position, writer=writer,
                        cooling_until=_datetime_or_none(acquisition.cooling_until),
                        circuit_open=acquisition.circuit_open,
                        rate_limited_until=_datetime_or_none(acquisition.rate_limited_until),
                        rate_limit=acquisition.rate_limit,
                        tenant_capped=acquisition.tenant_capped,
                    )
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
        green.take_database_connection()
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
        return acquire_step(step, service, limiter=self.limiter, owner=self.keeper.owner)

    def _started(self, job, step, service):
        logger.info("Started the call to %s.", service.name)
        return Claim(
            step=step,
            service=service,
            attempt=job.step_attempt,
            envelope=build_envelope(job, attempt=job.step_attempt, now=job.step_started_at),
            claimed_seq=job.last_event_seq,
            job=job,
            deadline_at=job.deadline_at,
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
                release_quietly(step, service, limiter=self.limiter)
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
            if message.service and not self.keeper.tracks(message.service, step_member(message)):
                # Its claim took the slot first, recording this process as
                # the owner of a call another process runs: give that up.
                after_commit(disown_step, message, owner=self.keeper.owner, limiter=self.limiter)
        elif message.step_index < job.total_steps:
            stale = dataclasses.replace(message, service=job.steps[message.step_index])
        else:
            stale = None
        if stale is not None:
            # A stale message may still own a slot, a reservation or a place
            # in line (taken by its own claim, or before the job was
            # cancelled while parked): free it.
            after_commit(release_step, stale, limiter=self.limiter)

    def _fail_past_deadline(self, job, step):
        """No call starts after the job's deadline: fail it, and free whatever its message took (a slot, a place)."""
        error = errors.DeadlineExceeded(
            f"The job's deadline ({job.deadline_at.isoformat()}) passed before step {job.current_step_index + 1} "
            f"of {job.total_steps} could start."
        )
        logger.warning("Failing the job: %s", error.message)
        job_steps.job_fail(job=job, failure=failure_from(error))
        after_commit(release_step, step, limiter=self.limiter)
        _free_key_place(job)

    def _fail_unavailable(self, job):
        error = errors.ServiceUnavailable(
            f"Service {job.current_service} is missing or disabled in the registry; "
            "enable it, then resume the job."
        )
        logger.warning("Failing the job: %s", error.message)
        job_steps.job_fail(job=job, failure=failure_from(error))
        _free_key_place(job)


def _free_key_place(job):
    """The failed job's place among its key's running jobs is free: let a held one in after commit."""
    if job.owner_id is not None:
        after_commit(admit_quietly, job_state.tenant_of(job))
