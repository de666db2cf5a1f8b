"""Web pages for staff: recent jobs, and one job's live step timeline with the work behind it.

A page needs a staff login and then the job permissions the admin grants
(``jobs.permissions``): reading to see anything, operating for the resume and
cancel buttons (and the resume command), adding for the new-job form. The job
page's data (``jobs.page_data``) comes with the page and, for its refreshes,
from ``/jobs/<id>/data``.
"""

from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.shortcuts import redirect, render
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from common.errors import error_body
from common.staff_data import staff_data_refusal
from jobs import selectors
from jobs.errors import JobNotFound
from jobs.models import JobStatus
from jobs.page_data import job_page_data, resume_command
from jobs.permissions import may_operate_jobs, may_read_deliveries, may_read_jobs, may_start_jobs
from jobs.services import FEATURE_NAME
from services_registry.selectors import recipe_list

RECENT_JOBS = 50

READ_REFUSED = "Reading jobs needs a staff login with the jobs.view_job permission."


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
    attempts = selectors.job_attempts(job)
    context = {
        "job": job,
        "steps": selectors.step_timeline(job, attempts),
        # Only the events the job row had counted when it was read: the page's
        # socket replays everything after job.last_event_seq, so an event
        # committed between the two reads must not be shown twice.
        "events": selectors.job_events(job.id, through=job.last_event_seq),
        "may_operate": may_operate_jobs(request.user),
        "data": _page_data(request, job, attempts=attempts),
    }
    return render(request, "jobs/job_detail.html", context)


@never_cache
def job_detail_data(request, job_id):
    """The job page's data as JSON; refusals in the API's error shape, never a redirect a script would follow."""
    # The same answer for every job id, as the page's: a refusal must not tell which jobs exist.
    refusal = staff_data_refusal(request, may_read=may_read_jobs, refused=READ_REFUSED)
    if refusal is not None:
        return refusal
    try:
        job = selectors.job_get(job_id, is_staff=True)
    except JobNotFound as exc:
        return JsonResponse(error_body(exc.code, exc.message), status=exc.status_code)
    return JsonResponse(_page_data(request, job))


def _require_read(request):
    # The same answer for every job id: a refusal must not tell which jobs exist.
    if not may_read_jobs(request.user):
        raise PermissionDenied(READ_REFUSED)


def _page_data(request, job, *, attempts=None):
    """``jobs.page_data`` plus what depends on who asks: the resume command and links to the delivery log."""
    data = job_page_data(job, attempts=attempts)
    data["resume"] = None
    if job.status == JobStatus.FAILED and may_operate_jobs(request.user):
        url = request.build_absolute_uri(reverse("job-resume", args=[job.pk]))
        data["resume"] = {"curl": resume_command(url, force=not job.retryable), "force": not job.retryable}
    data["delivery_log_url"] = None
    try:
        log_url = reverse("admin:webhooks_delivery_changelist")
    except NoReverseMatch:  # the ops console (which registers the delivery log) is not installed
        log_url = None
    if log_url and may_read_deliveries(request.user):
        data["delivery_log_url"] = f"{log_url}?job__exact={job.pk}"
        for delivery in data["deliveries"]:
            delivery["admin_url"] = reverse("admin:webhooks_delivery_change", args=[delivery["id"]])
    return data
