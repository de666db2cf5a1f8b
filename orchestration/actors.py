"""Dramatiq actors: thin interfaces that hand ids to the engine.

One step actor per queue in CAO_QUEUES (Dramatiq cannot choose a queue at
send time); ``rundramatiq --queues medium`` runs only the medium one. The
queue list is read when this module is imported, as workers declare their
actors at start-up.
"""

import dramatiq
from django.conf import settings

from common.backends import BACKEND_ERRORS

from orchestration.engine import Engine
from orchestration.messages import step_actor_name, step_time_limit_s


_engine = Engine()


def retry_when(retries, exception):
    # PostgreSQL or Redis failed: retried with backoff, nothing is lost while they come back.
    return isinstance(exception, BACKEND_ERRORS) and retries < settings.CAO_INFRA_MAX_RETRIES


def _declare_step_actor(queue):
    def run_step(job_id, step_index, token, service=None, tenant="", priority=0):
        # Messages sent before they named their service have three arguments,
        # those sent before they carried their place in line four.
        _engine.run_step(job_id, step_index, token, service, tenant=tenant, priority=priority)

    run_step.__name__ = step_actor_name(queue)
    return dramatiq.actor(
        run_step,
        actor_name=step_actor_name(queue),
        queue_name=queue,
        retry_when=retry_when,
        min_backoff=500,
        max_backoff=30_000,
        # Each step message carries its own limit, sized from its service's
        # timeout (dispatch.send_step); this default only covers messages
        # sent without one.
        time_limit=int(
            step_time_limit_s(
                settings.HTTP_READ_TIMEOUT_S,
                record_retry_s=settings.CAO_RECORD_RETRY_S,
                connect_timeout_s=settings.HTTP_CONNECT_TIMEOUT_S,
            )
            * 1000
        ),
    )


STEP_ACTORS = {queue: _declare_step_actor(queue) for queue in settings.CAO_QUEUES}
