"""Every encoding of a step (job, step index, token, service), in one place.

- The Dramatiq message that runs it. Dramatiq cannot pick a queue at send
  time, so each queue has its own step actor (declared in
  ``orchestration.actors``); senders build the message for the actor of the
  service's queue without importing the actors.
- Its lease member in the limiter, ``<job>:<step>:<token>``: a lease is named
  after the step message that holds it, so a stale or duplicate message can
  never release the slot of the attempt that is really running.
- The hand-off payload a parked step leaves with the limiter: the message to
  send when a slot is handed to it.
"""

import json

import dramatiq

from jobs.outcomes import StepDispatch


def step_actor_name(queue):
    return f"run_step_{queue}"


def step_message(*, queue, job_id, step_index, token, service, tenant="", priority=0, time_limit_s=None):
    """The message that runs step ``step_index`` of ``job_id`` under ``token``.

    It names the step's service, and where the step stands in that
    service's line (its job's ``tenant`` and ``priority``), so a worker can
    take the slot, or park the step, and claim it without reading the job
    first (``Engine.claim``).

    ``time_limit_s`` bounds the whole message (claim, call, record): it is
    set per message from the service's own timeout, so a 600 s call is not
    cut short by a limit sized for a 15 s one.
    """
    options = {"time_limit": int(time_limit_s * 1000)} if time_limit_s else {}
    return dramatiq.Message(
        queue_name=queue,
        actor_name=step_actor_name(queue),
        args=(str(job_id), step_index, token, service, tenant, priority),
        kwargs={},
        options=options,
    )


def step_time_limit_s(call_timeout_s, *, record_retry_s, connect_timeout_s):
    """The most one step message may take: its call, then recording while the database is down."""
    return connect_timeout_s + call_timeout_s + record_retry_s + 60


def lease_member(job_id, step_index, token):
    return f"{job_id}:{step_index}:{token}"


def step_member(step):
    """The lease of a step message (``StepDispatch``)."""
    return lease_member(step.job_id, step.step_index, step.token)


def parse_member(member):
    """``(job_id, step_index, token)`` of a lease member, or None if it is not a step's."""
    try:
        job_id, step_index, token = member.rsplit(":", 2)
        return job_id, int(step_index), int(token)
    except (AttributeError, ValueError):
        return None


def handoff_payload(dispatch):
    """What a parked step leaves with the limiter: the message to send on hand-off."""
    return json.dumps(
        [str(dispatch.job_id), dispatch.step_index, dispatch.token, dispatch.service, dispatch.tenant, dispatch.priority]
    )


def parse_handoff(payload):
    # Payloads left before steps carried their place in line have four items.
    job_id, step_index, token, service, *lane = json.loads(payload)
    tenant, priority = lane or ("", 0)
    return StepDispatch(job_id, step_index, token, service, tenant=tenant, priority=priority)
