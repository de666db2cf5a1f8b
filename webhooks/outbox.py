"""What the jobs core calls to put an event in the webhook outbox, in the event's own write.

``jobs.events.append_events`` asks ``wanted`` whether a job wants an event
delivered, builds the rows with ``delivery_rows`` and hands them to its
writer (the same transaction or the same statement as the event), then
``announce``s them after commit.
"""

from datetime import timedelta

from django.conf import settings

from api_keys.models import ANONYMOUS_PREFIX
from webhooks import addresses
from webhooks.dispatch import send_quietly
from webhooks.errors import InvalidWebhook, WebhookNeedsApiKey
from webhooks.models import DEFAULT_EVENTS, DELIVERABLE_EVENTS, Delivery, DeliveryState


def checked_webhook(*, url, events, owner):
    """``(url, events)`` to store on a new job, checked: ``("", [])`` for none. Raises InvalidWebhook."""
    if url is None or url == "":
        if events:
            raise InvalidWebhook(
                "webhook_events needs a webhook_url.", details={"webhook_events": "given without webhook_url"}
            )
        return "", []
    # Deliveries are signed with the owner's secret: staff sessions (no
    # owner) and anonymous clients (a shared key no client holds) have none to verify with.
    if owner is None or owner.prefix == ANONYMOUS_PREFIX:
        raise WebhookNeedsApiKey(details={"webhook_url": "needs an API key"})
    addresses.check_at_create(url)
    return url, checked_events(events)


def checked_events(events):
    """The event types to deliver: DEFAULT_EVENTS when None; each one deliverable, no duplicates."""
    if events is None:
        return list(DEFAULT_EVENTS)
    if not isinstance(events, list) or not events:
        raise InvalidWebhook(
            "webhook_events must be a non-empty list of event types.", details={"webhook_events": "expected a list"}
        )
    unknown = [event for event in events if not isinstance(event, str) or event not in DELIVERABLE_EVENTS]
    if unknown:
        raise InvalidWebhook(
            f"webhook_events has unknown or undeliverable types: {', '.join(map(str, unknown[:5]))[:200]}; "
            f"choose from {', '.join(DELIVERABLE_EVENTS)}.",
            details={"webhook_events": "unknown event type", "allowed": list(DELIVERABLE_EVENTS)},
        )
    return list(dict.fromkeys(events))


def wanted(job, event_type):
    """Whether ``job`` has a webhook that wants events of ``event_type``."""
    return bool(job.webhook_url) and event_type in (job.webhook_events or ())


def delivery_rows(job, events, *, now):
    """Unsaved ``Delivery`` rows for the events (JobEvent rows) of ``job`` that its webhook wants."""
    give_up_at = now + timedelta(seconds=settings.CAO_WEBHOOK_RETRY_FOR_S)
    return [
        Delivery(
            job_id=job.id, seq=event.seq, event_type=event.type, payload=event.payload, url=job.webhook_url,
            api_key_id=job.owner_id, state=DeliveryState.PENDING, attempts=0, next_attempt_at=now,
            give_up_at=give_up_at, created_at=now,
        )
        for event in events
        if wanted(job, event.type)
    ]


def announce(job_id):
    """After commit: send the message that delivers the job's pending events, in order."""
    send_quietly(job_id)


