"""Delivering a job's webhook events, one at a time and in order: claim (short), POST (no transaction), record.

Only the job's head (its pending delivery with the lowest seq) is ever
attempted, so a later event never overtakes an earlier one that is still
being retried; it waits until that one is delivered or given up.

The claim is a conditional update: it bumps ``attempts`` and takes a lease
only if the row is still pending, due and unleased, so two workers (a
duplicate message, maintenance's re-send) never send the same attempt at
once. The record applies only to the attempt it claimed. A worker that dies
mid-POST leaves its lease to expire; the attempt is then made again, with
the same ``webhook-id``.
"""

import logging
import socket
import time
from dataclasses import dataclass
from datetime import timedelta

import requests.certs
import urllib3
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from api_keys.selectors import webhook_signing_secrets
from common import metrics
from common.after_commit import after_commit
from common.logs import log_context
from webhooks import addresses, retry, signing
from webhooks.errors import AttemptFailed, InvalidWebhook, WebhookAddressNotAllowed
from webhooks.models import AttemptOutcome, Delivery, DeliveryAttempt, DeliveryState

logger = logging.getLogger(__name__)

# Of a receiver's answer only this much is read: it is not used.
MAX_ANSWER_BYTES = 4096
# How much of an error is kept on the row and the attempt.
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class Next:
    """What the actor sends after a run: a message for the job after ``delay_s``, or nothing (None)."""

    delay_s: float


def lease_s():
    """How long a claimed attempt holds its row: the request's timeouts twice over, and a margin."""
    return 2 * (settings.CAO_WEBHOOK_CONNECT_TIMEOUT_S + settings.CAO_WEBHOOK_TIMEOUT_S) + 5.0


def deliver_next(job_id, *, now=None, resolver=socket.getaddrinfo, clock=time.monotonic):
    """Attempt the job's head delivery if it is due and free; returns the ``Next`` message to send, or None."""
    with log_context(job_id=str(job_id)):
        delivery, otherwise = _claim_head(job_id, now=now or timezone.now())
        if delivery is None:
            return otherwise
        started_at = timezone.now()
        began = clock()
        try:
            status = _attempt(delivery, now=started_at, resolver=resolver)
        except AttemptFailed as failure:
            return _record_failure(delivery, failure, started_at=started_at, latency_ms=_ms(clock() - began))
        return _record_success(delivery, status, started_at=started_at, latency_ms=_ms(clock() - began))


def _claim_head(job_id, *, now):
    """``(delivery, None)`` when this run claimed the head's next attempt, else ``(None, Next or None)``."""
    head = Delivery.objects.filter(job_id=job_id, state=DeliveryState.PENDING).order_by("seq").first()
    if head is None or head.next_attempt_at > now:
        return None, None  # nothing to do, or not due: its retry message is on its way
    if head.lease_until is not None and head.lease_until > now:
        # Another worker holds it and sends what follows; should it have died
        # (this may be its message, returned by the broker), look again once its lease lapses.
        return None, Next(delay_s=(head.lease_until - now).total_seconds() + 0.5)
    claimed = (
        Delivery.objects.filter(pk=head.pk, state=DeliveryState.PENDING, attempts=head.attempts, next_attempt_at__lte=now)
        .filter(Q(lease_until__isnull=True) | Q(lease_until__lte=now))
        .update(attempts=F("attempts") + 1, lease_until=now + timedelta(seconds=lease_s()))
    )
    if not claimed:
        return None, None  # another worker claimed it first
    head.attempts += 1
    return head, None


def _attempt(delivery, *, now, resolver):
    """POST the event once; the status code of a 2xx answer, else AttemptFailed."""
    secrets = webhook_signing_secrets(delivery.api_key_id, now=now) if delivery.api_key_id else []
    if not secrets:
        raise AttemptFailed(AttemptOutcome.NO_SECRET, "The job's API key was deleted: nothing signs.", retryable=False)
    try:
        target = addresses.parse(delivery.url)
    except InvalidWebhook as invalid:
        # Accepted at create, refused now (an operator lowered the length limit, say): no retry can help.
        raise AttemptFailed(AttemptOutcome.ADDRESS_REFUSED, invalid.message, retryable=False) from None
    try:
        address = addresses.resolve(target, resolver=resolver)
    except WebhookAddressNotAllowed as refused:
        # The policy, not the receiver: retrying would not help.
        raise AttemptFailed(AttemptOutcome.ADDRESS_REFUSED, refused.message, retryable=False) from None
    except OSError as exc:
        raise AttemptFailed(AttemptOutcome.CONNECTION_ERROR, f"Cannot resolve {target.host}: {exc}") from None
    body = signing.body_of(delivery.payload)
    headers = signing.headers(msg_id=delivery.webhook_id, timestamp=int(now.timestamp()), body=body, secrets=secrets)
    status = post(target, address, body=body.encode(), headers=headers)
    if not 200 <= status < 300:
        raise AttemptFailed(AttemptOutcome.HTTP_ERROR, f"The receiver answered {status}.", status_code=status)
    return status


def post(target, address, *, body, headers):
    """POST ``body`` to ``target`` at ``address`` (already checked); the status code.

    Connects to the address, not the name, so no second resolution can
    swap it; TLS is still verified against the URL's host name. Redirects
    are not followed (a redirect could lead anywhere): a 3xx is a failure.
    """
    timeout = urllib3.Timeout(connect=settings.CAO_WEBHOOK_CONNECT_TIMEOUT_S, read=settings.CAO_WEBHOOK_TIMEOUT_S)
    options = {"timeout": timeout, "retries": False, "maxsize": 1, "block": False}
    if target.scheme == "https":
        pool = urllib3.HTTPSConnectionPool(
            address, target.port, server_hostname=target.host, assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED", ca_certs=requests.certs.where(), **options,
        )
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, **options)
    try:
        response = pool.urlopen(
            "POST", target.path, body=body, headers={**headers, "host": target.host_header},
            redirect=False, preload_content=False, assert_same_host=False,
        )
        try:
            response.read(MAX_ANSWER_BYTES)
        finally:
            response.release_conn()
        return response.status
    except urllib3.exceptions.NewConnectionError as exc:
        # Before TimeoutError: urllib3 makes it a ConnectTimeoutError, for compatibility.
        raise AttemptFailed(AttemptOutcome.CONNECTION_ERROR, f"Cannot connect: {exc}"[:MAX_ERROR_CHARS]) from None
    except urllib3.exceptions.TimeoutError as exc:
        raise AttemptFailed(AttemptOutcome.TIMEOUT, f"No answer in time: {exc}"[:MAX_ERROR_CHARS]) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise AttemptFailed(AttemptOutcome.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]) from None
    finally:
        pool.close()


def _record_success(delivery, status, *, started_at, latency_ms):
    now = timezone.now()
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery_id=delivery.pk, number=delivery.attempts, started_at=started_at, latency_ms=latency_ms,
            outcome=AttemptOutcome.DELIVERED, status_code=status,
        )
        recorded = _this_attempt(delivery).update(
            state=DeliveryState.DELIVERED, finished_at=now, lease_until=None, last_status_code=status, last_error="",
        )
        if recorded:
            after_commit(metrics.WEBHOOK_DELIVERED.inc)
            after_commit(
                logger.info, "Webhook %s (%s) delivered: %s in %s ms.", delivery.webhook_id, delivery.event_type,
                status, latency_ms,
            )
    return _whats_next(delivery.job_id)


def _record_failure(delivery, failure, *, started_at, latency_ms):
    now = timezone.now()
    decision = retry.after_failure(
        attempt=delivery.attempts, now=now, give_up_at=delivery.give_up_at, retryable=failure.retryable,
        base_s=settings.CAO_WEBHOOK_RETRY_BASE_S, cap_s=settings.CAO_WEBHOOK_RETRY_MAX_DELAY_S,
    )
    error = failure.message[:MAX_ERROR_CHARS]
    with transaction.atomic():
        DeliveryAttempt.objects.create(
            delivery_id=delivery.pk, number=delivery.attempts, started_at=started_at, latency_ms=latency_ms,
            outcome=failure.outcome, status_code=failure.status_code, error=error, next_attempt_at=decision.at,
        )
        changes = {"lease_until": None, "last_status_code": failure.status_code, "last_error": error}
        if decision.gives_up:
            changes.update(state=DeliveryState.FAILED, finished_at=now)
        else:
            changes.update(next_attempt_at=decision.at)
        recorded = _this_attempt(delivery).update(**changes)
        if recorded:
            after_commit(metrics.WEBHOOK_FAILED.labels(failure.outcome).inc)
            if decision.gives_up:
                after_commit(metrics.WEBHOOK_GAVE_UP.labels(failure.outcome).inc)
            after_commit(
                logger.warning, "Webhook %s (%s) attempt %s failed (%s): %s; %s.", delivery.webhook_id,
                delivery.event_type, delivery.attempts, failure.outcome, error,
                "given up" if decision.gives_up else f"next try at {decision.at.isoformat()}",
            )
    if not recorded:
        return None  # the row moved on (redelivered, or the lease lapsed and another worker took it)
    if decision.gives_up:
        return _whats_next(delivery.job_id)
    return Next(delay_s=max(0.0, (decision.at - timezone.now()).total_seconds()))


def _this_attempt(delivery):
    return Delivery.objects.filter(pk=delivery.pk, state=DeliveryState.PENDING, attempts=delivery.attempts)


def _whats_next(job_id):
    """After a head is done with: a message at once if the job has another pending delivery."""
    if Delivery.objects.filter(job_id=job_id, state=DeliveryState.PENDING).exists():
        return Next(delay_s=0.0)
    return None


def _ms(seconds):
    return max(0, int(seconds * 1000))
