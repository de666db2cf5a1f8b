"""The record phase of a step: store the call's result, then advance, retry or fail the job.

One conditional statement against the job as the claim left it; when the job
moved meanwhile, or the database failed, decided again under the row lock,
retrying until the database answers (the result is only in memory). The
outcome names the next message (``outcome.dispatch``); the engine sends it
once the commit is done, with the slot's release.
"""

import copy
import logging

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from common.after_commit import after_commit
from common.backends import DATABASE_ERRORS
from common.logs import redact
from jobs import selectors as job_selectors
from jobs import state as job_state
from jobs import steps as job_steps
from jobs.events import publish
from jobs.models import ACTIVE_STATUSES, StepState
from jobs.outcomes import RecordOutcome
from jobs.writes import LOCKED, ConditionalWrite
from orchestration import errors
from orchestration.database_retry import DatabaseRetry
from orchestration.errors import failure_from
from orchestration.retry import retry_delay
from services_registry.selectors import service_live

logger = logging.getLogger(__name__)


class RecordPhase:
    """``Engine.record`` and its paths; uses the engine's ``rng`` and ``sleep``."""

    def record(self, claim, reply):
        """Store the attempt's result and return the ``RecordOutcome``, once committed; retries the database until it answers.

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
            left_s = claim.time_left_s(timezone.now())
            if delay is not None and left_s is not None and delay >= left_s:
                reply = errors.DeadlineExceeded(
                    f"{reply.message} The next attempt would start after the job's deadline "
                    f"({claim.deadline_at.isoformat()}).",
                    status_code=reply.status_code,
                    call_cut_off=False,
                )
                delay = None
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
        return outcome

    def _recorded_before(self, job, claim):
        """Whether an earlier try of this record committed although its commit raised."""
        return job_selectors.attempt_recorded(job.id, token=claim.step.token)

    def _finish_ambiguous_commit(self, job, claim):
        # The commit went through but its after-commit work never ran: name
        # the next step's message for the engine to send (still ours if its
        # token is the next one) and push the events, instead of leaving both
        # to maintenance.
        logger.warning("The result was stored by an earlier try whose commit raised; finishing its work.")
        dispatch = None
        if job.status in ACTIVE_STATUSES and job.step_state == StepState.QUEUED and job.step_token == claim.step.token + 1:
            due_in_s = (job.step_due_at - timezone.now()).total_seconds() if job.step_due_at else 0.0
            dispatch = job_state.current_step(job, delay_s=max(0.0, due_in_s))
        after_commit(publish, str(job.id), job_selectors.job_events(job.id, after=claim.claimed_seq))
        return RecordOutcome(accepted=True, dispatch=dispatch)


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
