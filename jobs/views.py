"""Web pages for staff: recent jobs, and one job's live step timeline.

A page needs a staff login and then the job permissions the admin grants
(``jobs.permissions``): reading to see anything, operating for the resume and
cancel buttons, adding for the new-job form.
"""

from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.shortcuts import redirect, render
from django.views.decorators.http import require_GET

from jobs import selectors
from jobs.errors import JobNotFound
from jobs.models import JobStatus
from jobs.permissions import may_operate_jobs, may_read_jobs, may_start_jobs
from jobs.services import FEATURE_NAME
from services_registry.selectors import recipe_list

RECENT_JOBS = 50


@require_GET
def home(request):
    return redirect("job-page-list")


@staff_member_required
@require_GET
def job_list_page(request):
    _require_read(request)
    status = request.GET.get("status") or None
    feature_name = request.GET.get("feature") or None
    if status not in JobStatus.values:
        status = None
    if feature_name and not FEATURE_NAME.fullmatch(feature_name):
        feature_name = None
    jobs = selectors.job_list(is_staff=True, status=status, feature_name=feature_name)[:RECENT_JOBS]
    context = {
        "jobs": jobs,
        "statuses": JobStatus.values,
        "features": [recipe.name for recipe in recipe_list(enabled_only=False)],
        "selected_status": status or "",
        "selected_feature": feature_name or "",
        "may_start": may_start_jobs(request.user),
    }
    template = "jobs/_job_rows.html" if request.GET.get("partial") else "jobs/job_list.html"
    return render(request, template, context)


@staff_member_required
@require_GET
def job_detail_page(request, job_id):
    _require_read(request)
    try:
        job = selectors.job_get(job_id, is_staff=True)
    except JobNotFound:
        return render(request, "jobs/job_missing.html", {"job_id": job_id}, status=404)
    context = {
        "job": job,
        "steps": selectors.step_timeline(job, selectors.job_attempts(job)),
        # Only the events the job row had counted when it was read: the page's
        # socket replays everything after job.last_event_seq, so an event
        # committed between the two reads must not be shown twice.
        "events": selectors.job_events(job.id, through=job.last_event_seq),
        "may_operate": may_operate_jobs(request.user),
    }
    return render(request, "jobs/job_detail.html", context)


def _require_read(request):
    # The same answer for every job id: a refusal must not tell which jobs exist.
    if not may_read_jobs(request.user):
        raise PermissionDenied("Reading jobs needs the jobs.view_job permission.")
