"""A step's slot of its service: take it, give it back, pass it on.

A slot is a lease in the service's limiter named after the step message
(``messages.step_member``). ``acquire_step`` takes one or parks the step in
line, leaving the message to send when a slot is handed over; every release
sends the messages of the waiters it handed slots to (``send_handoffs``).
"""

import logging
import threading
import time
import weakref
from dataclasses import dataclass

from django.conf import settings
from django.db import connections

from api_keys.selectors import lane_policy
from jobs import selectors as job_selectors
from orchestration import errors
from orchestration.dispatch import log_unsent, send_step
from orchestration.messages import handoff_payload, lease_member, parse_handoff, step_member
from orchestration.per_process import get_limiter
from services_registry.selectors import service_live

logger = logging.getLogger(__name__)


def acquire_step(step, service, *, limiter=None, owner=None):
    """Take a slot of ``service`` for ``step``, or its place in line; the ``Acquisition``.

    The line is served round-robin across tenants (the job's API key), by
    their share weights and up to their caps, and by aged priority within each.

    Should Redis have lost the service's keys, the calls in flight that the
    database knows of re-seed them first (the census), so the limit holds.
    Parked by the requests-per-minute budget, the line is pumped again when
    it has room (one timer per service and process).
    """
    limiter = limiter or get_limiter()
    policy = lane_policy(step.tenant)
    acquisition = limiter.acquire(
        service.name,
        step_member(step),
        limit=service.concurrency_limit,
        ttl_s=service.lease_ttl_s,
        payload=handoff_payload(step),
        census=lambda: [lease_member(*call) for call in job_selectors.calls_in_flight(service.name)],
        owner=owner,
        requests_per_minute=service.requests_per_minute,
        rate_window_s=settings.CAO_RATE_WINDOW_S,
        tenant=step.tenant,
        weight=policy.weight,
        tenant_cap=policy.cap,
        priority=step.priority,
        aging_s=settings.CAO_PRIORITY_AGING_S,
        tokens_per_minute=service.tokens_per_minute,
        token_estimate=service.tokens_per_call,
    )
    if acquisition.rate_limited_until is not None:
        _pump_line_at(acquisition.rate_limited_until, service.name, limiter)
    return acquisition


def send_handoffs(payloads):
    """Send the messages of waiters that were just handed a slot."""
    for payload in payloads:
        try:
            send_step(parse_handoff(payload))
        except Exception:
            # The grant lapses after CAO_HANDOFF_TTL_S and maintenance re-hands it.
            logger.warning("Could not dispatch a hand-off (%s); maintenance will retry.", payload, exc_info=True)


def disown_step(step, *, owner, limiter=None):
    """A copy of a running step's message took its slot: the slot stays, its owner is not this process."""
    if owner:
        (limiter or get_limiter()).disown(step.service, step_member(step), owner=owner)


def release_step(step, *, limit=None, limiter=None, tokens_used=None):
    """Give back the slot (or place in line) of ``step`` and pass it on.

    ``tokens_used``: what its call's reply said it used, counted against the
    service's tokens_per_minute in place of its estimate.
    """
    if limit is None:
        service = service_live(step.service)
        limit = service.concurrency_limit if service else 0
    release_member(step.service, step_member(step), limit=limit, limiter=limiter, tokens_used=tokens_used)


def release_member(service_name, member, *, limit, limiter=None, tokens_used=None):
    """Give back ``member``'s slot (or place in line) of ``service_name`` and pass it on (``release_step``'s work)."""
    limiter = limiter or get_limiter()
    released = limiter.release_call(service_name, member, limit=limit, tokens_used=tokens_used).run()
    _pass_on(service_name, released, limiter)


def release_and_send(step, service, dispatch, *, limiter=None, pushes=None, tokens_used=None):
    """Give back ``step``'s slot and send ``dispatch`` (its job's next message), in one round trip.

    ``pushes`` (``jobs.publisher.HeldPushes``, the record's events) go
    first when the channel layer allows it, so subscribers see a step end
    before the next one starts. The release goes before the message, so a
    next step on the same service finds the slot free. Neither is lost to
    the other's failure: a message that could not be sent is re-sent by
    maintenance (its dispatch marker is missing), and the release is tried
    again on its own.
    """
    limiter = limiter or get_limiter()
    limit = (service_live(service.name) or service).concurrency_limit
    published = pushes.take_calls() if pushes else []
    try:
        *pushed, released = send_step(
            dispatch,
            first=[
                *published,
                limiter.release_call(step.service, step_member(step), limit=limit, tokens_used=tokens_used),
            ],
        )
    except Exception:
        log_unsent(dispatch)
        release_quietly(step, service, limiter=limiter, tokens_used=tokens_used)
        return
    if any(isinstance(reply, Exception) for reply in pushed):
        # Subscribers read what a push missed from the log.
        logger.warning("Could not push the events of job_id=%s step_index=%s.", step.job_id, step.step_index)
    if isinstance(released, Exception):
        release_quietly(step, service, limiter=limiter, tokens_used=tokens_used)
    else:
        _pass_on(step.service, released, limiter)


def _pass_on(service_name, released, limiter):
    """Send a release's hand-offs; a budget it found spent, with others still in line, gets the line a pump."""
    send_handoffs(limiter.handoffs_of(released))
    blocked_until = limiter.line_blocked_until(released)
    if blocked_until is not None:
        _pump_line_at(blocked_until, service_name, limiter)


def release_quietly(step, service, *, limiter=None, tokens_used=None):
    """``release_step`` under ``service``'s limit as the registry has it now, logging instead of raising."""
    try:
        release_step(
            step, limit=(service_live(service.name) or service).concurrency_limit, limiter=limiter,
            tokens_used=tokens_used,
        )
    except Exception:
        # The lease expires after lease_ttl_s; nothing else is lost.
        logger.warning(
            "Could not release the slot of job_id=%s step_index=%s on %s; it expires by itself.",
            step.job_id, step.step_index, step.service, exc_info=True,
        )


def cool_down(service, seconds, *, limiter=None):
    """``service`` asked callers to come back in ``seconds`` (429/503 with Retry-After): no call to it starts before then.

    For every job: calls in flight go on, the others wait in its line and
    spend no attempt (at most CAO_RETRY_MAX_DELAY_S, the longest a retry
    waits). When it ends, a timer of this process hands the free slots to
    the line; should the process die first, maintenance's redispatch does.
    """
    limiter = limiter or get_limiter()
    seconds = min(seconds, settings.CAO_RETRY_MAX_DELAY_S)
    try:
        limiter.cool_down(service.name, seconds=seconds)
    except Exception:
        logger.warning("Could not cool %s down; its next callers may be refused too.", service.name, exc_info=True)
        return
    logger.warning("%s asked to retry in %.1f s: no call to it starts before then.", service.name, seconds)
    _pump_line_in(seconds, service.name, limiter)


def report_outcome(step, service, reply, *, limiter=None):
    """Tell ``service``'s circuit breaker how ``step``'s call ended (``reply``), when it has a breaker.

    A success closes an open circuit (and the line moves); a failure that
    says the service is unwell counts, and the one that opens the circuit
    sets a timer for its probe (maintenance's redispatch, should this
    process die first). Nothing is sent while the breaker is off.
    """
    live = service_live(service.name) or service
    if not live.breaker_threshold or reply is None:
        return
    ok = not isinstance(reply, errors.StepError)
    if not ok and not reply.counts_against_service:
        return  # the request's fault, or the gateway's: nothing said of the service
    limiter = limiter or get_limiter()
    try:
        _, opened, handoffs = limiter.report_outcome(
            service.name, step_member(step), ok=ok, threshold=live.breaker_threshold,
            open_s=live.breaker_open_s, limit=live.concurrency_limit,
        )
    except Exception:
        logger.warning("Could not tell the circuit breaker of %s how a call ended.", service.name, exc_info=True)
        return
    send_handoffs(handoffs)
    if opened:
        logger.warning(
            "Opened the circuit of %s (%s consecutive failures, or its probe failed); "
            "one probe call goes through in %.1f s.", service.name, live.breaker_threshold, live.breaker_open_s,
        )
        _pump_line_in(live.breaker_open_s, service.name, limiter)


def close_circuit(service, *, limiter=None):
    """Forget ``service``'s circuit breaker state (its breaker was switched off) and let its line move."""
    limiter = limiter or get_limiter()
    try:
        _, _, handoffs = limiter.report_outcome(
            service.name, "", ok=True, threshold=0, open_s=service.breaker_open_s, limit=service.concurrency_limit
        )
    except Exception:
        # An open circuit still lets its probe through, whose success closes it.
        logger.warning("Could not close the circuit of %s.", service.name, exc_info=True)
        return
    send_handoffs(handoffs)


def _pump_line_in(seconds, service_name, limiter, *, failures=0, pending=None):
    timer = threading.Timer(seconds + PUMP_MARGIN_S, _pump_line, args=(service_name, limiter, failures, pending))
    timer.daemon = True
    timer.start()


# Per limiter and service: the timer of this process due to pump a blocked
# line and not yet fired, with when it is due (UNIX seconds).
_pending_pumps = weakref.WeakKeyDictionary()
_pending_pumps_lock = threading.Lock()


@dataclass(frozen=True, eq=False)
class _PendingPump:
    due: float


def _pump_line_at(unix_s, service_name, limiter):
    """One timer per service for a blocked line: thousands of parked steps must not start thousands.

    A timer due by then that has not fired yet pumps for this caller too:
    it reads the line when it fires, and goes on while anyone waits. Whether
    it has fired is what it says, not what the clock says: a timer that
    wakes a little early by the wall clock must not mistake its own entry
    for another timer's and leave the line with none.
    """
    pending = _PendingPump(unix_s)
    with _pending_pumps_lock:
        by_service = _pending_pumps.setdefault(limiter, {})
        due = by_service.get(service_name)
        if due is not None and due.due <= unix_s:
            return
        by_service[service_name] = pending
    try:
        _pump_line_in(max(0.0, unix_s - time.time()), service_name, limiter, pending=pending)
    except BaseException:
        _forget_pending(service_name, limiter, pending)
        raise


def _forget_pending(service_name, limiter, pending):
    with _pending_pumps_lock:
        by_service = _pending_pumps.get(limiter, {})
        if by_service.get(service_name) is pending:
            del by_service[service_name]


# Past a cool-down's end (or an open circuit's wait) by the server's clock before the line is pumped.
PUMP_MARGIN_S = 0.01
# A pump that could not reach Redis tries again this much later, this many times; then maintenance's redispatch does.
PUMP_RETRY_S = 1.0
PUMP_RETRIES = 5
# Grants one pump makes in a row while its window keeps making room.
PUMP_ROUNDS = 4


def _pump_line(service_name, limiter, failures=0, pending=None):
    """Hand the free slots to the line (or the one probe to an open circuit's) once it may grant again.

    When a cool-down or an open circuit was extended meanwhile, or the
    budget is spent again, waits for that end instead, as long as anyone
    waits: a waiter whose reservation is not taken in time (its hand-off
    lost) goes back to the line, and the next pump hands it over again.
    """
    if pending is not None:
        _forget_pending(service_name, limiter, pending)  # from here on, a new park needs a timer of its own
    try:
        occupancy = limiter.occupancy(service_name)
        for _ in range(PUMP_ROUNDS):
            if occupancy.blocked_for_s > 0:
                break
            service = service_live(service_name)
            limit = service.concurrency_limit if service else 0
            handoffs = limiter.redispatch_waiters(service_name, limit=limit)
            send_handoffs(handoffs)
            # A budget spent again by these grants: the rest of the line waits for its next room.
            occupancy = limiter.occupancy(service_name)
            # Or the window moved on while they were made (it granted fewer
            # than it has room for now): grant again, while slots are free.
            if not (handoffs and occupancy.waiting and occupancy.in_use < limit):
                break
        if occupancy.blocked_for_s > 0 and occupancy.waiters:
            _pump_line_at(time.time() + occupancy.blocked_for_s, service_name, limiter)
    except Exception:
        if failures < PUMP_RETRIES:
            logger.warning("Could not move the line of %s; trying again in %.0f s.", service_name, PUMP_RETRY_S, exc_info=True)
            _pump_line_in(PUMP_RETRY_S, service_name, limiter, failures=failures + 1)
        else:
            logger.warning("Could not move the line of %s; maintenance will.", service_name, exc_info=True)
    finally:
        # The timer's own thread (a greenlet in a green worker) may have read
        # the registry: give its connection back rather than leave it open.
        connections.close_all()
