"""Admin for API keys: create one (the key is shown once), deactivate, share busy services, see last use."""

from django.contrib import admin, messages

from api_keys.models import ApiKey


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = [
        "name", "key_prefix", "is_staff", "is_active", "share_weight", "max_calls_per_service", "max_concurrent_jobs",
        "created_at", "last_used_at",
    ]
    list_filter = ["is_staff", "is_active"]
    search_fields = ["name", "prefix"]
    readonly_fields = ["key_prefix", "created_at", "last_used_at"]
    fields = [
        "name", "is_staff", "is_active", "share_weight", "max_calls_per_service", "max_concurrent_jobs", "key_prefix",
        "created_at", "last_used_at",
    ]

    @admin.display(description="key")
    def key_prefix(self, api_key):
        return f"cao_{api_key.prefix}_…" if api_key.prefix else "(generated on save)"

    def save_model(self, request, obj, form, change):
        raw_key = None if change else obj.set_new_key()
        super().save_model(request, obj, form, change)
        if raw_key:
            messages.warning(request, f"The new API key is {raw_key} — copy it now, it will not be shown again.")
