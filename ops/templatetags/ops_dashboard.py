"""The admin index's dashboard line (jobs by status over the last 24 hours) and the link to the live overview."""

from datetime import timedelta
from urllib.parse import urlencode

from django import template
from django.urls import reverse
from django.utils import timezone

from ops.permissions import may_view_overview
from ops.selectors import job_counts_by_status

register = template.Library()

WINDOW = timedelta(hours=24)


@register.inclusion_tag("ops/jobs_last_24h.html")
def jobs_last_24h():
    since = timezone.now() - WINDOW
    changelist = reverse("admin:jobs_job_changelist")
    counts = [
        {
            "status": status,
            "count": count,
            # The job list filtered the same way, so a count leads to its jobs.
            "url": f"{changelist}?{urlencode({'status__exact': status, 'created_at__gte': since.isoformat()})}",
        }
        for status, count in job_counts_by_status(since=since).items()
    ]
    return {"counts": counts, "total": sum(item["count"] for item in counts)}


@register.simple_tag(takes_context=True)
def overview_url(context):
    """The live overview's URL for a user who may open it, else ""."""
    request = context.get("request")
    user = getattr(request, "user", None) or context.get("user")
    return reverse("ops-overview") if may_view_overview(user) else ""
