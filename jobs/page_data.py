"""What the staff job page shows of a job's work, JSON-ready: the one read behind its first render and its refreshes.

The input, each step's output and attempts (with the error of each failed
one), the waterfall of those attempts (``jobs.waterfall``), what holds a
waiting step back, and the job's webhook deliveries. Three queries whatever
the job's size: its attempts, the waterfall's events, and its deliveries
with their latest attempt's latency.
"""

import shlex

from django.utils import timezone

from jobs import selectors
from jobs.models import ACTIVE_STATUSES, AttemptOutcome, EventType, StepState
from jobs.waterfall import WATERFALL_EVENTS, held_by_text, place_in_line, waterfall
from webhooks.models import DeliveryState
from webhooks.selectors import job_deliveries


def job_page_data(job, *, attempts=None, now=None):
    """The page's data for ``job`` (as read: events up to its ``last_event_seq``).

    ``attempts``: its StepAttempt rows, when the caller read them already.
    """
    now = now or timezone.now()
    attempts = selectors.job_attempts(job) if attempts is None else attempts
    events = selectors.job_events_of_types(job.pk, WATERFALL_EVENTS, through=job.last_event_seq)
    return {
        "job_id": str(job.pk),
        "status": job.status,
        "last_event_seq": job.last_event_seq,
        "generated_at": now.isoformat(),
        "input_data": job.context.get("initial_input", {}),
        "steps": [
            {
                "index": step["index"],
                "service": step["service"],
                "state": step["state"],
                "output": step["output"],
                "attempts": [_attempt(attempt) for attempt in step["attempt_history"]],
            }
            for step in selectors.step_timeline(job, attempts)
        ],
        "held_by": held_by(job, events),
        "waterfall": waterfall(job, attempts, events, now=now),
        "webhook_url": job.webhook_url,
        "deliveries": [_delivery(delivery) for delivery in job_deliveries(job.pk)],
    }


def held_by(job, events):
    """What holds the job's current step back while it waits (its latest ``WAITING_FOR_SLOT``); else None."""
    if job.status not in ACTIVE_STATUSES or job.step_state not in (StepState.WAITING, StepState.HELD):
        return None
    for event in reversed(events):
        payload = event["payload"]
        if event["type"] == EventType.WAITING_FOR_SLOT and payload.get("step_index") == job.current_step_index:
            limit, position = payload.get("limit"), payload.get("position")
            return {
                "step_index": job.current_step_index,
                "service": job.current_service,
                "limit": limit,
                "position": position,
                "place": place_in_line(limit, position),
                "since": event["created_at"].isoformat(),
                # A cool-down's or a spent budget's end, when the limiter said.
                "until": payload.get("cooling_until") or payload.get("until"),
                "text": held_by_text(job.current_service, limit, position),
                "message": payload.get("message", ""),
            }
    return None


def resume_command(url, *, force):
    """The ``curl`` that resumes a failed job through the API (README: Resume or cancel); ``force`` needs a staff key."""
    command = f'curl -s -X POST {shlex.quote(url)} -H "X-API-Key: $CAO_KEY"'
    if force:
        command += """ -H "Content-Type: application/json" -d '{"force": true}'"""
    return command


def _attempt(attempt):
    failed = attempt.outcome in (AttemptOutcome.FAILED, AttemptOutcome.LOST)
    return {
        "attempt": attempt.attempt,
        "token": attempt.token,
        "outcome": attempt.outcome,
        "started_at": attempt.started_at.isoformat(),
        "finished_at": attempt.finished_at.isoformat() if attempt.finished_at else None,
        "duration_ms": attempt.duration_ms,
        "http_status": attempt.http_status,
        "error": {
            "code": attempt.error_code,
            "message": attempt.error_message,
            "http_status": attempt.http_status,
        } if failed else None,
    }


def _delivery(delivery):
    pending = delivery.state == DeliveryState.PENDING
    return {
        "id": delivery.pk,
        "webhook_id": delivery.webhook_id,
        "seq": delivery.seq,
        "event_type": delivery.event_type,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "last_status_code": delivery.last_status_code,
        "last_latency_ms": delivery.last_latency_ms,
        "next_attempt_at": delivery.next_attempt_at.isoformat() if pending else None,
        "last_error": delivery.last_error,
        "created_at": delivery.created_at.isoformat(),
        "finished_at": delivery.finished_at.isoformat() if delivery.finished_at else None,
    }
