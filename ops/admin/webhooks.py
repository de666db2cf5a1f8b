"""Webhook deliveries in the admin: the log per job and per API key, each attempt, and redelivery."""

from django.contrib import admin, messages
from django.urls import reverse
from django.utils.html import format_html

from ops.admin.jobs import precise_time, status_badge
from webhooks.models import Delivery, DeliveryAttempt
from webhooks.services import deliveries_redeliver


class DeliveryAttemptInline(admin.TabularInline):
    model = DeliveryAttempt
    verbose_name_plural = "attempts"
    extra = 0
    can_delete = False
    fields = readonly_fields = ["number", "started", "outcome_badge", "status_code", "latency", "error", "next_try"]
    ordering = ["number"]

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="started")
    def started(self, attempt):
        return precise_time(attempt.started_at)

    @admin.display(description="outcome")
    def outcome_badge(self, attempt):
        return status_badge(attempt.outcome)

    @admin.display(description="latency")
    def latency(self, attempt):
        return "" if attempt.latency_ms is None else f"{attempt.latency_ms} ms"

    @admin.display(description="next try")
    def next_try(self, attempt):
        return precise_time(attempt.next_attempt_at) if attempt.next_attempt_at else ""


@admin.register(Delivery)
class DeliveryAdmin(admin.ModelAdmin):
    list_display = [
        "webhook_id", "event_type", "state_badge", "attempts", "last_status_code", "next_try", "error",
        "job_link", "api_key", "created_at",
    ]
    list_filter = ["state", "event_type", "api_key"]
    search_fields = ["^job__id", "url", "last_error"]
    search_help_text = "Job id (or its beginning), URL, or error text."
    list_select_related = ["api_key"]
    list_per_page = 50
    show_full_result_count = False
    actions = ["redeliver_selected"]
    inlines = [DeliveryAttemptInline]
    fields = readonly_fields = [
        "webhook_id", "job_link", "seq", "event_type", "url", "api_key", "state_badge", "attempts", "next_try",
        "lease_until", "give_up_at", "created_at", "finished_at", "last_status_code", "last_error", "payload",
    ]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="webhook-id")
    def webhook_id(self, delivery):
        return format_html("<code>{}</code>", delivery.webhook_id)

    @admin.display(description="state", ordering="state")
    def state_badge(self, delivery):
        return status_badge(delivery.state)

    @admin.display(description="next try", ordering="next_attempt_at")
    def next_try(self, delivery):
        return precise_time(delivery.next_attempt_at) if delivery.state == "PENDING" else ""

    @admin.display(description="last error")
    def error(self, delivery):
        text = delivery.last_error
        return text if len(text) <= 80 else f"{text[:79]}…"

    @admin.display(description="job")
    def job_link(self, delivery):
        url = reverse("admin:jobs_job_change", args=[delivery.job_id])
        return format_html('<a href="{}"><code>{}…</code></a>', url, str(delivery.job_id)[:8])

    @admin.action(description="Redeliver the selected deliveries (same webhook-id, fresh 24 h of retries)",
                  permissions=["change"])
    def redeliver_selected(self, request, queryset):
        count = deliveries_redeliver(delivery_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"{count} deliver{'y' if count == 1 else 'ies'} queued again.", messages.SUCCESS)

