"""The ops console: every ModelAdmin that needs more than its own app's data."""

from django.contrib import admin

from ops.admin import jobs, recipes, services, webhooks  # noqa: F401  (each module registers its admin)

admin.site.site_header = "CAO Gateway operations"
admin.site.site_title = "CAO Gateway"
admin.site.index_title = "Operations"
