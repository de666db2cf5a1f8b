"""Recipes in the admin: ordered steps inline, duplication, and the jobs running each one."""

from django.contrib import admin, messages
from django.contrib.admin.utils import quote
from django.urls import reverse
from django.utils.html import format_html

from ops.selectors import with_active_job_count
from services_registry.forms import RecipeStepFormSet
from services_registry.models import Recipe, RecipeStep
from services_registry.services import recipe_duplicate


class RecipeStepInline(admin.TabularInline):
    model = RecipeStep
    formset = RecipeStepFormSet
    extra = 0
    min_num = 1
    ordering = ["position"]
    fields = ["position", "service"]


@admin.register(Recipe)
class RecipeAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "step_list", "active_jobs", "updated_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "description"]
    inlines = [RecipeStepInline]
    actions = ["duplicate"]

    def get_queryset(self, request):
        return with_active_job_count(super().get_queryset(request).prefetch_related("steps__service"))

    @admin.display(description="steps")
    def step_list(self, recipe):
        steps = sorted(recipe.steps.all(), key=lambda step: step.position)
        return " → ".join(step.service.name for step in steps)

    @admin.display(description="jobs running", ordering="active_job_count")
    def active_jobs(self, recipe):
        return recipe.active_job_count

    @admin.action(description="Duplicate selected recipes (copies start disabled)", permissions=["add"])
    def duplicate(self, request, queryset):
        for recipe in queryset:
            copy = recipe_duplicate(recipe=recipe)
            self.log_addition(request, copy, f"Duplicated from {recipe.name}.")
            url = reverse(f"admin:{self.opts.app_label}_{self.opts.model_name}_change", args=[quote(copy.pk)])
            self.message_user(
                request,
                format_html(
                    'Duplicated {} as <a href="{}">{}</a>, disabled: enable it when it is ready.',
                    recipe.name, url, copy.name,
                ),
                messages.SUCCESS,
            )
