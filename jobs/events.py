"""The job event log: rows written with the state change they describe.

``append_events`` writes with the state change it describes: inside the
transaction that changes the locked job row, or in the same conditional
statement (``jobs.writes``). Seq numbers come from ``Job.last_event_seq`` on
that row, which makes them gapless and unique per job. Pushing to live
subscribers happens only after commit, so nobody sees an event that was
rolled back. An event the job's webhook wants gets its outbox row
(``webhooks.outbox``) in the same write, and its delivery message after commit.
"""

from django.utils import timezone

from jobs.models import EventType, JobEvent
from jobs.publisher import get_publisher
from jobs.writes import LOCKED
from webhooks import outbox

# JOB_ERROR's ``action``: what a client can do about the failure.
RETRY_AVAILABLE = "RETRY_AVAILABLE"
CONTACT_SUPPORT = "CONTACT_SUPPORT"


def event(type, *, step_index=None, message="", **fields):
    """An event to append: its type, the step it is about, and extra fields."""
    return {"type": EventType(type), "step_index": step_index, "message": message, **fields}


def append_events(job, *events, now=None, writer=LOCKED):
    """Store ``events`` for ``job`` and publish them after commit.

    Advances ``job.last_event_seq``; the caller saves the job with the same
    ``writer`` (``jobs.writes``), in the same transaction.
    """
    now = now or timezone.now()
    rows = []
    for spec in events:
        job.last_event_seq += 1
        payload = event_payload(
            spec, job_id=job.id, seq=job.last_event_seq, now=now, total_steps=job.total_steps, steps=job.steps
        )
        rows.append(
            JobEvent(job=job, seq=payload["seq"], type=payload["type"], payload=payload, created_at=now)
        )
    writer.add_events(job, rows)
    payloads = [row.payload for row in rows]
    writer.after_commit(publish, str(job.id), payloads)
    if job.webhook_url:
        # The webhook outbox: its rows go with the events, its message after commit.
        deliveries = outbox.delivery_rows(job, rows, now=now)
        if deliveries:
            writer.add_deliveries(job, deliveries)
            writer.after_commit(outbox.announce, job.id)
    return payloads


def event_payload(spec, *, job_id, seq, now, total_steps, steps):
    """What is stored and pushed for the event ``spec`` (from ``event``): the one shape clients see."""
    spec = dict(spec)
    step_index = spec.pop("step_index")
    payload = {
        "type": str(spec.pop("type")),
        "job_id": str(job_id),
        "seq": seq,
        "ts": now.isoformat(),
        "total_steps": total_steps,
        "message": spec.pop("message"),
    }
    if step_index is not None:
        payload["step_index"] = step_index
        payload["step_name"] = steps[step_index]
    payload.update(spec)
    return payload


def publish(job_id, payloads):
    """Push committed events to live subscribers (best effort: the log is the truth)."""
    get_publisher().publish(job_id, payloads)
