"""Who may open the live overview: staff who may read jobs and see the services, as the admin grants them."""

from api_keys.authentication import session_has_any
from jobs.permissions import may_read_jobs

READ_SERVICES = ("services_registry.view_service", "services_registry.change_service")


def may_view_overview(user):
    """A staff session with ``jobs.view_job`` (or change) and ``services_registry.view_service`` (or change)."""
    return may_read_jobs(user) and session_has_any(user, READ_SERVICES)
