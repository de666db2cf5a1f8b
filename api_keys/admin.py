"""Admin for API keys: create one (the key is shown once), deactivate, share busy services, see last use,
read and rotate the webhook signing secret."""

from django.contrib import admin, messages
from django.conf import settings
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html

from api_keys.models import ApiKey
from api_keys.services import webhook_secret_rotate


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name", "key_prefix", "is_staff", "is_active", "share_weight", "max_calls_per_service", "max_concurrent_jobs",
        "created_at", "last_used_at",
    ]
    list_filter = ["is_staff", "is_active"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["key_prefix", "created_at", "last_used_at", "signing_secret", "webhook_deliveries"]
    fields = [
        "name", "is_staff", "is_active", "share_weight", "max_calls_per_service", "max_concurrent_jobs", "key_prefix",
        "created_at", "last_used_at", "signing_secret", "webhook_deliveries",
    ]
    actions = ["rotate_webhook_secret"]

    @admin.display(description="key")
    def key_prefix(self, api_key):
        return f"cao_{api_key.prefix}_…" if api_key.prefix else "(generated on save)"

    @admin.display(description="webhook signing secret")
    def signing_secret(self, api_key):
        if not api_key.pk:
            return "(generated on save)"
        if api_key.previous_webhook_secret and api_key.previous_webhook_secret_until:
            return format_html(
                "<code>{}</code><br>previous, still signing until {}: <code>{}</code>",
                api_key.webhook_secret, api_key.previous_webhook_secret_until.isoformat(timespec="seconds"),
                api_key.previous_webhook_secret,
            )
        return format_html("<code>{}</code>", api_key.webhook_secret)

    @admin.display(description="webhook deliveries")
    def webhook_deliveries(self, api_key):
        # Linked by URL name: the delivery log is the webhooks app's, registered by the ops console.
        try:
            url = reverse("admin:webhooks_delivery_changelist")
        except NoReverseMatch:
            return "-"
        return format_html('<a href="{}?api_key__id__exact={}">this key\'s delivery log</a>', url, api_key.pk)

    @admin.action(description="Rotate the webhook signing secret (the old one signs during the grace period)")
    def rotate_webhook_secret(self, request, queryset):
        for api_key in queryset:
            webhook_secret_rotate(api_key_id=api_key.pk)
        hours = settings.CAO_WEBHOOK_SECRET_GRACE_S / 3600
        self.message_user(
            request,
            f"Rotated the signing secret of {queryset.count()} key(s); deliveries carry both signatures for "
            f"{hours:g} h (CAO_WEBHOOK_SECRET_GRACE_S).",
            messages.SUCCESS,
        )

    def save_model(self, request, obj, form, change):
        raw_key = None if change else obj.set_new_key()
        super().save_model(request, obj, form, change)
        if raw_key:
            messages.warning(request, f"The new API key is {raw_key} — copy it now, it will not be shown again.")
