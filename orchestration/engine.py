"""Run one step of a job: claim, call, record, release.

    claim  (``claim_phase``, one statement): take a slot of the message's
           service, then start the attempt if the message's step is still
           current; with no free slot, or a message that is not current,
           read the job first and park in the service's line, or drop it
    call   (no transaction): POST the envelope while the lease is renewed
    record (``record_phase``, one conditional statement): store the output
           and advance, or schedule a retry, or fail the job
    release: give the slot back and send the job's next message, in one
           Redis round trip (or hold the slot one more timeout period after
           a timeout: the service may still be working)

A conditional statement (``jobs.writes.ConditionalWrite``) applies only if
the job row has not moved since it was read; when it has, or anything is
out of the ordinary, the phase is decided again in a short transaction with
the job row locked. No transaction is ever held across the downstream call.
Messages and hand-offs leave after commit. A message that is not for the
current step under the current token is dropped, so redelivery and
duplicates are safe.
"""

import logging
import random
import time

from django.utils import timezone

from common import green, metrics
from common.logs import log_context
from jobs.publisher import get_publisher
from orchestration import errors
from orchestration.admission import admit_quietly
from orchestration.claim_phase import ClaimPhase
from orchestration.dispatch import send_quietly
from orchestration.http_client import ServiceClient, ServiceReply
from orchestration.per_process import get_keeper, get_limiter
from orchestration.record_phase import RecordPhase
from orchestration.slots import cool_down, release_and_send, release_quietly, report_outcome
from orchestration.token_usage import tokens_reported

logger = logging.getLogger(__name__)


class Engine(ClaimPhase, RecordPhase):
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

    def run_step(self, job_id, step_index, token, service=None, *, tenant="", priority=0):
        """Handle one step message; returns the Claim when a call was made.

        Once a slot is taken, every way out of the call and record phases
        gives it back: a reply that cannot be stored, or a bug, ends the
        attempt as a typed failure instead of stranding the job and the slot.
        """
        with log_context(job_id=str(job_id), step_index=step_index):
            claim = self.claim(job_id, step_index, token, service, tenant=tenant, priority=priority)
            if claim is None:
                return None
            # A green worker's connection serves other steps while this call waits.
            green.release_database_connection()
            reply = outcome = None
            # The record's pushes wait for the release's round trip (or the block's end).
            with get_publisher().held() as pushes:
                try:
                    with self.keeper.keep(claim.service.name, claim.member, claim.service.lease_ttl_s):
                        reply = self.call(claim)
                        green.take_database_connection()
                        outcome = self.record(claim, reply)
                finally:
                    # After the keeper let go of the lease: a renewal must not re-add it.
                    self._release(claim, reply, outcome.dispatch if outcome else None, pushes)
            if outcome is not None and outcome.ended and claim.step.tenant:
                admit_quietly(claim.step.tenant)  # its key's place is free
            return claim

    def call(self, claim):
        """POST the envelope; the ServiceReply, or the StepError that ended the attempt.

        A job's deadline bounds the call below the service's own timeout; a
        call cut off by it is DEADLINE_EXCEEDED.
        """
        started = time.perf_counter()
        left_s = claim.time_left_s(timezone.now())
        bounded = left_s is not None and left_s < claim.service.effective_timeout_s
        try:
            if bounded and left_s <= 0:
                raise errors.DeadlineExceeded("The job's deadline passed before the call started.", call_cut_off=False)
            reply = self.client.execute(
                claim.service, envelope=claim.envelope, idempotency_key=claim.idempotency_key,
                timeout_s=left_s if bounded else None,
            )
        except errors.DownstreamTimeout as error:
            reply = error
            if bounded and not isinstance(error, errors.DeadlineExceeded):
                reply = errors.DeadlineExceeded(
                    f"{claim.service.name} had not answered when the job's deadline passed "
                    f"({claim.deadline_at.isoformat()}); the call was cut off."
                )
        except errors.StepError as error:
            reply = error
        except Exception as exc:
            logger.exception("The call to %s failed inside the gateway.", claim.service.name)
            reply = errors.GatewayFault(f"The gateway failed while calling {claim.service.name} ({type(exc).__name__}).")
        metrics.observe_call(claim.service.name, reply, time.perf_counter() - started)
        return reply

    # --- release ---------------------------------------------------------------

    def _release(self, claim, reply, dispatch, pushes=None):
        """Give back the slot and send ``dispatch``, the next message the record committed (None: none).

        ``pushes``: the record's held pushes, to send in the same round trip.
        """
        report_outcome(claim.step, claim.service, reply, limiter=self.limiter)
        if isinstance(reply, errors.ResourceExhausted) and reply.retry_after_s:
            # The service's verdict on every caller, not this job's alone:
            # cooled down before the slot goes back, so nobody takes it now.
            cool_down(claim.service, reply.retry_after_s, limiter=self.limiter)
        if getattr(reply, "call_may_still_run", False):
            self._hold_after_timeout(claim)
            if dispatch:
                send_quietly(dispatch)
            return
        # A reply's own count replaces the call's estimate in the tokens budget.
        used = tokens_reported(reply.metrics) if isinstance(reply, ServiceReply) else None
        if dispatch:
            release_and_send(claim.step, claim.service, dispatch, limiter=self.limiter, pushes=pushes, tokens_used=used)
        else:
            release_quietly(claim.step, claim.service, limiter=self.limiter, tokens_used=used)

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
