"""The admin index's dashboard line: jobs by status over the last 24 hours."""

from datetime import timedelta
from urllib.parse import urlencode

from django import template
from django.urls import reverse
from django.utils import timezone

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
