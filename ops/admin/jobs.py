"""Jobs in the admin: find, inspect, and resume or cancel them (never edit them)."""

import json

from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpResponseNotAllowed
from django.urls import path, reverse
from django.utils.dateformat import format as date_format
from django.utils.html import format_html, format_html_join
from django.utils.timesince import timesince
from django.utils.timezone import localtime

from common.errors import GatewayError
from jobs.models import Job, JobEvent, JobStatus, StepAttempt
from jobs.selectors import job_attempts, step_timeline
from ops.admin.redirects import back_to_change_page
from ops.job_operations import CANCEL, FORCE_RESUME, OPERATIONS, RESUME, operations_for
from webhooks.models import Delivery


def status_badge(status):
    return format_html('<span class="cao-badge cao-status-{}">{}</span>', status.lower(), status)


def precise_time(moment):
    """Local time to the second: the order of attempts and events is what matters."""
    return date_format(localtime(moment), "Y-m-d H:i:s")


def step_of(job):
    """1-based position of the current step, e.g. "step 3 of 4"."""
    total = job.total_steps
    return f"step {min(job.current_step_index + 1, total)} of {total}"


class JobChangeList(ChangeList):
    def get_queryset(self, request, exclude_parameters=None):
        # The list never shows the context, which holds every step's output.
        return super().get_queryset(request, exclude_parameters).defer("context")


class JobPartInline(admin.TabularInline):
    """Read-only rows that belong to a job: visible to whoever may see the job."""

    extra = 0
    can_delete = False
    show_change_link = False

    def has_view_permission(self, request, obj=None):
        opts = Job._meta
        return any(
            request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
            for action in ("view", "change")
        )

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


class StepAttemptInline(JobPartInline):
    model = StepAttempt
    verbose_name_plural = "step attempts"
    fields = readonly_fields = ["step", "service", "attempt", "outcome_badge", "started", "duration", "error"]
    ordering = ["started_at", "id"]

    @admin.display(description="step")
    def step(self, attempt):
        return attempt.step_index + 1

    @admin.display(description="outcome")
    def outcome_badge(self, attempt):
        return status_badge(attempt.outcome)

    @admin.display(description="started")
    def started(self, attempt):
        return precise_time(attempt.started_at)

    @admin.display(description="duration")
    def duration(self, attempt):
        return "" if attempt.duration_ms is None else f"{attempt.duration_ms} ms"

    @admin.display(description="error")
    def error(self, attempt):
        if not attempt.error_code:
            return ""
        status = f" (HTTP {attempt.http_status})" if attempt.http_status else ""
        return f"{attempt.error_code}{status}: {attempt.error_message}"


class JobEventInline(JobPartInline):
    model = JobEvent
    verbose_name_plural = "event log"
    fields = readonly_fields = ["seq", "at", "event_type", "step", "message"]
    ordering = ["seq"]

    @admin.display(description="at")
    def at(self, event):
        return precise_time(event.created_at)

    @admin.display(description="type")
    def event_type(self, event):
        return event.type

    @admin.display(description="step")
    def step(self, event):
        index = event.payload.get("step_index")
        return "" if index is None else f"{index + 1} {event.payload.get('step_name', '')}"

    @admin.display(description="message")
    def message(self, event):
        return event.payload.get("message", "")


class DeliveryInline(JobPartInline):
    """A job's webhook deliveries, on its admin page; each links to its attempts."""

    model = Delivery
    verbose_name_plural = "webhook deliveries"
    fields = readonly_fields = ["delivery", "event_type", "state_badge", "attempts", "last_status_code", "next_try",
                                "last_error"]
    ordering = ["seq"]

    @admin.display(description="webhook-id")
    def delivery(self, delivery):
        url = reverse("admin:webhooks_delivery_change", args=[delivery.pk])
        return format_html('<a href="{}"><code>{}</code></a>', url, delivery.webhook_id)

    @admin.display(description="state")
    def state_badge(self, delivery):
        return status_badge(delivery.state)

    @admin.display(description="next try")
    def next_try(self, delivery):
        return precise_time(delivery.next_attempt_at) if delivery.state == "PENDING" else ""


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = [
        "job_id", "feature_name", "status_colored", "progress", "current_step", "age", "error_code",
        "retryable_if_failed", "owner",
    ]
    list_display_links = ["job_id"]
    list_filter = ["status", "feature_name", "retryable", "created_at"]
    search_fields = ["^id", "error_code", "owner__name", "^owner__prefix"]
    search_help_text = "Job id (or its beginning), error code, or the owner's API key name or prefix."
    list_select_related = ["owner"]
    list_per_page = 50
    # A filtered list skips the extra COUNT(*) over every job: slow on a big table.
    show_full_result_count = False
    actions = ["resume_selected", "force_resume_selected", "cancel_selected"]
    inlines = [StepAttemptInline, JobEventInline, DeliveryInline]
    fieldsets = [
        (None, {"fields": ["id", "feature_name", "status_colored", "progress", "current_step", "owner",
                           "priority", "idempotency_key"]}),
        ("Error", {"fields": ["error_code", "error_message", "retryable"]}),
        ("Steps", {"fields": ["step_table"]}),
        ("Context", {"fields": ["context_json"]}),
        ("Webhook", {"fields": ["webhook_url", "webhook_events"]}),
        ("Times", {"fields": ["created_at", "updated_at", "last_progress_at", "finished_at", "deadline_at"]}),
    ]

    # --- Permissions: read-only rows; actions need jobs.change_job ----------

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        # Field-by-field edits are never allowed; state changes go through the actions.
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_operate_permission(self, request, obj=None):
        return request.user.has_perm(f"{self.opts.app_label}.{get_permission_codename('change', self.opts)}")

    # --- List -----------------------------------------------------------------

    def get_changelist(self, request, **kwargs):
        return JobChangeList

    @admin.display(description="id", ordering="id")
    def job_id(self, job):
        # The beginning is enough to tell jobs apart and to search; the page shows all of it.
        return format_html('<code title="{}">{}…</code>', job.pk, str(job.pk)[:8])

    @admin.display(description="status", ordering="status")
    def status_colored(self, job):
        return status_badge(job.status)

    @admin.display(description="progress")
    def progress(self, job):
        return step_of(job)

    @admin.display(description="current step")
    def current_step(self, job):
        service = job.current_service
        if service is None or job.status == JobStatus.COMPLETED:
            return ""
        if job.is_terminal or job.status == JobStatus.FAILED:
            return service
        return f"{service} ({job.step_state.lower()})"

    @admin.display(description="age", ordering="-created_at")
    def age(self, job):
        return format_html('<span title="{}">{}</span>', job.created_at.isoformat(), timesince(job.created_at))

    @admin.display(description="retryable", ordering="retryable")
    def retryable_if_failed(self, job):
        if job.status != JobStatus.FAILED:
            return ""
        return "yes" if job.retryable else "no"

    # --- Detail ---------------------------------------------------------------

    @admin.display(description="steps")
    def step_table(self, job):
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td>{}</td><td><span class="cao-badge cao-state-{}">{}</span></td><td>{}</td><td>{}</td></tr>',
            (
                (
                    step["index"] + 1, step["service"], step["state"], step["state"], step["attempts"],
                    "" if step["duration_ms"] is None else f"{step['duration_ms']} ms",
                )
                for step in step_timeline(job, job_attempts(job))
            ),
        )
        return format_html(
            '<table class="cao-steps"><thead><tr><th>#</th><th>service</th><th>state</th><th>attempts</th>'
            "<th>duration</th></tr></thead><tbody>{}</tbody></table>",
            rows,
        )

    @admin.display(description="context")
    def context_json(self, job):
        return format_html(
            '<pre class="cao-json">{}</pre>', json.dumps(job.context, indent=2, ensure_ascii=False)
        )

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None and self.has_operate_permission(request, obj):
            context["job_operations"] = operations_for(obj)
        return super().render_change_form(request, context, add, change, form_url, obj)

    def get_urls(self):
        operate = path(
            "<path:object_id>/operate/<slug:operation>/",
            self.admin_site.admin_view(self.operate_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_operate",
        )
        return [operate, *super().get_urls()]

    def operate_view(self, request, object_id, operation):
        """A button of the detail page: run one operation on one job, then show the job again."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if operation not in OPERATIONS:
            raise Http404(f"No job operation {operation!r}.")
        if not self.has_operate_permission(request):
            raise PermissionDenied
        job = self.get_object(request, unquote(object_id))
        if job is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        self.operate(request, [job.pk], OPERATIONS[operation])
        return back_to_change_page(self, request, job)

    # --- Actions --------------------------------------------------------------

    @admin.action(description="Resume selected failed jobs", permissions=["operate"])
    def resume_selected(self, request, queryset):
        self.operate(request, queryset.values_list("pk", flat=True), RESUME)

    @admin.action(description="Force resume selected failed jobs (also non-retryable)", permissions=["operate"])
    def force_resume_selected(self, request, queryset):
        self.operate(request, queryset.values_list("pk", flat=True), FORCE_RESUME)

    @admin.action(description="Cancel selected jobs", permissions=["operate"])
    def cancel_selected(self, request, queryset):
        self.operate(request, queryset.values_list("pk", flat=True), CANCEL)

    def operate(self, request, job_ids, operation):
        """Run ``operation`` on each job; log what was done, say why anything was refused."""
        done = []
        for job_id in list(job_ids):
            try:
                outcome = operation.run(job_id)
            except GatewayError as exc:
                self.message_user(request, f"Job {job_id} was not {operation.past}: {exc.message}", messages.ERROR)
                continue
            description = operation.describe(outcome)
            self.log_change(request, outcome.job, description)
            done.append((job_id, description))
        if len(done) == 1:
            job_id, description = done[0]
            self.message_user(request, f"Job {job_id}: {description}", messages.SUCCESS)
        elif done:
            self.message_user(request, f"{operation.past.capitalize()} {len(done)} jobs.", messages.SUCCESS)
