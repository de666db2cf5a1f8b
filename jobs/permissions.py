"""What a staff user's session may do with jobs: exactly what the admin grants it.

API keys are not concerned: a client key sees its own jobs, a staff key all
of them (``api_keys.authentication.caller_scope``). A session user must be an
active staff member, and then:

- reading jobs, their context and their events needs ``jobs.view_job`` or
  ``jobs.change_job`` (the admin's rule: whoever may change may view);
- resuming and cancelling needs ``jobs.change_job``, and so does a forced
  resume (which is also staff-only, as every such session is);
- starting a job needs ``jobs.add_job``;
- following a job page's links to the admin's webhook delivery log needs
  ``webhooks.view_delivery`` or ``webhooks.change_delivery``.

The API views name these in ``session_permissions``, the pages and the
WebSocket consumer call the helpers below; the admin applies the same model
permissions itself.
"""

from api_keys.authentication import session_has_any

READ_JOBS = ("jobs.view_job", "jobs.change_job")
OPERATE_JOBS = ("jobs.change_job",)
START_JOBS = ("jobs.add_job",)
READ_DELIVERIES = ("webhooks.view_delivery", "webhooks.change_delivery")


def may_read_jobs(user):
    return session_has_any(user, READ_JOBS)


def may_operate_jobs(user):
    return session_has_any(user, OPERATE_JOBS)


def may_start_jobs(user):
    return session_has_any(user, START_JOBS)


def may_read_deliveries(user):
    return session_has_any(user, READ_DELIVERIES)
