"""Step messages: one Dramatiq actor per queue, addressed by name.

Dramatiq cannot pick a queue at send time, so each queue has its own step
actor (declared in ``orchestration.actors``); senders build the message for
the actor of the service's queue without importing the actors.
"""

import dramatiq


def step_actor_name(queue):
    return f"run_step_{queue}"


def step_message(*, queue, job_id, step_index, token):
    """The message that runs step ``step_index`` of ``job_id`` under ``token``."""
    return dramatiq.Message(
        queue_name=queue,
        actor_name=step_actor_name(queue),
        args=(str(job_id), step_index, token),
        kwargs={},
        options={},
    )
