"""Services in the admin: tune limits and URLs, see live slot usage, check health now."""

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.contrib.admin.views.main import ChangeList
from django.core.exceptions import PermissionDenied
from django.http import HttpResponseNotAllowed
from django.urls import path
from django.utils.html import format_html
from django.utils.safestring import mark_safe

from common.after_commit import after_commit
from ops.admin.redirects import back_to_change_page
from ops.occupancy import key_names, read_occupancies
from orchestration.slots import close_circuit
from services_registry.forms import ServiceForm
from services_registry.health import check_services
from services_registry.models import Service


class ServiceChangeList(ChangeList):
    def get_results(self, request):
        super().get_results(request)
        # Read the limiter once per page; the occupancy column uses the result.
        occupancies = read_occupancies(self.result_list)
        for service in self.result_list:
            service.live_occupancy = occupancies[service.name]


def describe_occupancy(occupancy, limit):
    """ "in use 2 / 3 · 1 waiting (oldest 4.2 s) · cooling down 3.0 s", or "unavailable" when Redis cannot be read."""
    if occupancy is None:
        return mark_safe('<span class="cao-unavailable" title="Redis cannot be reached">unavailable</span>')
    waiting = f"{occupancy.waiting} waiting"
    if occupancy.waiters:
        waiting += f" (oldest {occupancy.oldest_wait_s:.1f} s)"
    if occupancy.cooling_until:
        # It answered 429/503 with Retry-After: no call starts before then.
        waiting += f" · cooling down {max(0.0, occupancy.cooling_until - occupancy.now):.1f} s"
    if occupancy.requests_per_minute:
        waiting += f" · {occupancy.requests_in_window} / {occupancy.requests_per_minute} calls this minute"
    if occupancy.tokens_per_minute:
        waiting += f" · {occupancy.tokens_in_window} / {occupancy.tokens_per_minute} tokens this minute"
    if occupancy.circuit == "open":
        waiting += f" · circuit open, probe in {max(0.0, (occupancy.probe_at or 0) - occupancy.now):.1f} s"
    elif occupancy.circuit == "probing":
        waiting += " · circuit open, probing"
    if occupancy.waiting_by_tenant:
        names = key_names(tenant for tenant, _ in occupancy.waiting_by_tenant)
        shares = ", ".join(f"{names[tenant]} {count}" for tenant, count in occupancy.waiting_by_tenant)
        waiting += f" · waiting by key: {shares}"
    return format_html(
        '<span class="cao-occupancy{}">in use {} / {}</span> <span class="cao-waiting">· {}</span>',
        " cao-full" if occupancy.in_use >= limit else "",
        occupancy.in_use,
        limit,
        waiting,
    )


def describe_health(service, result):
    """One message line for a health check result."""
    latency = f"{result['latency_ms']:g} ms"
    subject = f"Health of {service.name}"
    if result["ok"]:
        return f"{subject}: ok, HTTP {result['status_code']} from {service.health_url} in {latency}."
    if "status_code" in result:
        return f"{subject}: unhealthy, HTTP {result['status_code']} from {service.health_url} in {latency}."
    return f"{subject}: {result['error']} ({service.health_url}, {latency})."


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    form = ServiceForm
    list_display = [
        "name",
        "queue",
        "concurrency_limit",
        "occupancy",
        "timeout_s",
        "lease_ttl_s",
        "max_attempts",
        "effective_url",
        "enabled",
    ]
    list_filter = ["queue", "enabled"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["occupancy", "effective_url", "updated_at"]
    actions = ["check_health"]
    fieldsets = [
        (None, {"fields": ["name", "queue", "enabled"]}),
        ("Limits", {"fields": [
            "concurrency_limit", "requests_per_minute", "tokens_per_minute", "tokens_per_call", "occupancy",
            "timeout_s", "lease_ttl_s", "max_attempts",
        ]}),
        ("Circuit breaker", {"fields": ["breaker_threshold", "breaker_open_s"]}),
        (
            "Endpoint",
            {
                "fields": [
                    "base_url",
                    "effective_url",
                    "execute_path",
                    "health_path",
                    "auth_type",
                    "auth_header_name",
                ]
            },
        ),
        (None, {"fields": ["updated_at"]}),
    ]

    def get_changelist(self, request, **kwargs):
        return ServiceChangeList

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "breaker_threshold" in form.changed_data and not obj.breaker_threshold:
            # Switched off: an open circuit must not keep its line waiting for a probe.
            after_commit(close_circuit, obj)

    @admin.display(description="occupancy")
    def occupancy(self, service):
        if service.pk is None:
            return "-"
        if not hasattr(service, "live_occupancy"):
            service.live_occupancy = read_occupancies([service])[service.name]
        return describe_occupancy(service.live_occupancy, service.concurrency_limit)

    @admin.display(description="effective URL")
    def effective_url(self, service):
        if service.url_override:
            return format_html(
                '{} <span class="cao-override" title="set by the environment">(from {})</span>',
                service.effective_base_url,
                service.url_env_var,
            )
        return service.effective_base_url

    # --- Health check: an action on the list, a button on the detail page -----

    @admin.action(description="Check health now", permissions=["view"])
    def check_health(self, request, queryset):
        self.report_health(request, queryset)

    def report_health(self, request, services):
        services = list(services)
        results = check_services(services, timeout_s=settings.CAO_HEALTH_TIMEOUT_S)
        for service in services:
            result = results[service.name]
            level = messages.SUCCESS if result["ok"] else messages.ERROR
            self.message_user(request, describe_health(service, result), level)

    def get_urls(self):
        check = path(
            "<path:object_id>/check-health/",
            self.admin_site.admin_view(self.check_health_view),
            name=f"{self.opts.app_label}_{self.opts.model_name}_check_health",
        )
        return [check, *super().get_urls()]

    def check_health_view(self, request, object_id):
        """The detail page's "Check health now" button."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        service = self.get_object(request, unquote(object_id))
        if service is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        if not self.has_view_or_change_permission(request, service):
            raise PermissionDenied
        self.report_health(request, [service])
        return back_to_change_page(self, request, service)
