"""The job page's waterfall: every attempt of every step on one time axis, and what each wait was for.

Pure: built from a job's attempt rows and the few events that say when a
step began to wait for a slot (``WAITING_FOR_SLOT``), when it backed off
before a retry (``STEP_RETRYING``) and when the job stopped (``JOB_ERROR``,
``JOB_CANCELLED``). Times are milliseconds from the job's creation.

A step's segments, in time order:

- ``wait``: from its ``WAITING_FOR_SLOT`` to its next call (or next wait,
  or the job's stop);
- ``call``: an attempt, started to finished (to ``now`` while it runs);
- ``backoff``: from a failed attempt's ``STEP_RETRYING`` to the next wait
  or call of the step.

A wait or back-off with nothing after it runs to ``now`` while the job is
active (``ongoing``), else to the job's end.
"""

from jobs.models import ACTIVE_STATUSES, AttemptOutcome, EventType

# The events the waterfall is built from; the page reads only these.
WATERFALL_EVENTS = (
    EventType.WAITING_FOR_SLOT, EventType.STEP_RETRYING, EventType.JOB_ERROR, EventType.JOB_CANCELLED,
)
_STOPS = (EventType.JOB_ERROR, EventType.JOB_CANCELLED)

# A service's line reports how many callers are ahead (0: next); a key's
# held jobs are numbered from 1 (jobs.admission.hold).
KEY_JOBS = "key_jobs"


def ordinal(n):
    """1st, 2nd, 3rd, 4th, ... 11th, 12th, 13th, ... 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def place_in_line(limit, position):
    """The 1-based place of a waiter from its event's ``position``; None when the event gave none."""
    if position is None:
        return None
    return position if limit == KEY_JOBS else position + 1


def held_by_text(service, limit, position):
    """What holds a waiting step, in words: ``waiting for a slot of fast_chat_llm — held by requests_per_minute, 3rd in line``."""
    what = "one of its API key's places" if limit == KEY_JOBS else f"a slot of {service}"
    text = f"waiting for {what} — held by {limit or 'concurrency'}"
    place = place_in_line(limit, position)
    return text if place is None else f"{text}, {ordinal(place)} in line"


def waterfall(job, attempts, events, *, now):
    """``{"origin", "span_ms", "segments"}`` for ``job``.

    ``attempts``: its StepAttempt rows; ``events``: its events of
    ``WATERFALL_EVENTS`` as dicts with ``type``, ``created_at`` and
    ``payload``, in seq order; ``now``: the end of what is still going on.
    """
    origin = job.created_at
    active = job.status in ACTIVE_STATUSES

    def ms(moment):
        return max(0, round((moment - origin).total_seconds() * 1000))

    stops = [event["created_at"] for event in events if event["type"] in _STOPS]
    # Whatever a step does next ends its wait or back-off: a call, another wait, a retry.
    next_moves = {}
    for attempt in attempts:
        next_moves.setdefault(attempt.step_index, []).append(attempt.started_at)
    for event in events:
        if event["type"] in (EventType.WAITING_FOR_SLOT, EventType.STEP_RETRYING):
            next_moves.setdefault(event["payload"].get("step_index"), []).append(event["created_at"])
    job_end = job.finished_at or job.updated_at or now

    def end_of_pause(step_index, start):
        later = [moment for moment in (*next_moves.get(step_index, ()), *stops) if moment > start]
        if later:
            return min(later), False
        if active and step_index == job.current_step_index:
            return now, True
        return max(start, job_end), False

    segments = []
    for attempt in attempts:
        ongoing = attempt.finished_at is None
        segments.append(_segment(
            "call", attempt.step_index, attempt.service, ms(attempt.started_at),
            ms(now if ongoing else attempt.finished_at), ongoing, label=_call_label(attempt),
            attempt=attempt.attempt, outcome=attempt.outcome, http_status=attempt.http_status,
            error_code=attempt.error_code,
        ))
    for event in events:
        payload = event["payload"]
        step_index = payload.get("step_index")
        if event["type"] not in (EventType.WAITING_FOR_SLOT, EventType.STEP_RETRYING) or step_index is None:
            continue
        service = job.steps[step_index]
        end, ongoing = end_of_pause(step_index, event["created_at"])
        if event["type"] == EventType.WAITING_FOR_SLOT:
            limit, position = payload.get("limit"), payload.get("position")
            segments.append(_segment(
                "wait", step_index, service, ms(event["created_at"]), ms(end), ongoing,
                label=held_by_text(service, limit, position), limit=limit, place=place_in_line(limit, position),
            ))
        else:
            segments.append(_segment(
                "backoff", step_index, service, ms(event["created_at"]), ms(end), ongoing,
                label=f"retry back-off after attempt {payload.get('attempt')} ({payload.get('error_code')}; "
                f"retry in {payload.get('retry_in_ms')} ms)",
                attempt=payload.get("attempt"), retry_in_ms=payload.get("retry_in_ms"),
            ))
    segments.sort(key=lambda segment: (segment["start_ms"], segment["end_ms"]))
    span_end = ms(now) if active else ms(job_end)
    span_ms = max([1, span_end, *(segment["end_ms"] for segment in segments)])
    return {"origin": origin.isoformat(), "span_ms": span_ms, "segments": segments}


def _segment(kind, step_index, service, start_ms, end_ms, ongoing, *, label, **figures):
    return {
        "kind": kind, "step_index": step_index, "service": service, "start_ms": start_ms,
        "end_ms": max(start_ms, end_ms), "ongoing": ongoing, "label": label, **figures,
    }


def _call_label(attempt):
    label = f"{attempt.service} · attempt {attempt.attempt} · {attempt.outcome}"
    if attempt.outcome in (AttemptOutcome.FAILED, AttemptOutcome.LOST):
        detail = " ".join(str(part) for part in (attempt.http_status, attempt.error_code) if part)
        if detail:
            label = f"{label} ({detail})"
    return label
