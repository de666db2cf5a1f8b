"""Step messages: one Dramatiq actor per queue, addressed by name.

Dramatiq cannot pick a queue at send time, so each queue has its own step
actor (declared in ``orchestration.actors``); senders build the message for
the actor of the service's queue without importing the actors.
"""

import dramatiq


def step_actor_name(queue):
    return f"run_step_{queue}"


def step_message(*, queue, job_id, step_index, token, service, time_limit_s=None):
    """The message that runs step ``step_index`` of ``job_id`` under ``token``.

    It names the step's service, so a worker can take the slot and claim
    the step without reading the job first (``Engine.claim``).

    ``time_limit_s`` bounds the whole message (claim, call, record): it is
    set per message from the service's own timeout, so a 600 s call is not
    cut short by a limit sized for a 15 s one.
    """
    options = {"time_limit": int(time_limit_s * 1000)} if time_limit_s else {}
    return dramatiq.Message(
        queue_name=queue,
        actor_name=step_actor_name(queue),
        args=(str(job_id), step_index, token, service),
        kwargs={},
        options=options,
    )


def step_time_limit_s(call_timeout_s, *, record_retry_s, connect_timeout_s):
    """The most one step message may take: its call, then recording while the database is down."""
    return connect_timeout_s + call_timeout_s + record_retry_s + 60
