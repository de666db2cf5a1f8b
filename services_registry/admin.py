"""Admin for services and recipes: ops tune limits and edit recipes here."""

from django import forms
from django.conf import settings
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.utils.html import format_html

from services_registry.models import Recipe, RecipeStep, Service


class ServiceForm(forms.ModelForm):
    class Meta:
        model = Service
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Queues come from settings at request time, so they are not model choices.
        self.fields["queue"] = forms.ChoiceField(
            choices=[(queue, queue) for queue in settings.CAO_QUEUES],
            help_text=Service._meta.get_field("queue").help_text,
        )


@admin.register(Service)
class ServiceAdmin(admin.ModelAdmin):
    form = ServiceForm
    list_display = [
        "name",
        "queue",
        "concurrency_limit",
        "timeout_s",
        "lease_ttl_s",
        "max_attempts",
        "effective_url",
        "enabled",
    ]
    list_filter = ["queue", "enabled"]
    search_fields = ["name", "base_url"]
    readonly_fields = ["effective_url", "updated_at"]
    fieldsets = [
        (None, {"fields": ["name", "queue", "enabled"]}),
        ("Limits", {"fields": ["concurrency_limit", "timeout_s", "lease_ttl_s", "max_attempts"]}),
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

    @admin.display(description="effective URL")
    def effective_url(self, service):
        if service.url_override:
            return format_html(
                '{} <span class="cao-override" title="set by the environment">(from {})</span>',
                service.effective_base_url,
                service.url_env_var,
            )
        return service.effective_base_url


class RecipeStepFormSet(forms.BaseInlineFormSet):
    """Checks the step list as a whole, with the same rule the model applies."""

    def clean(self):
        if any(self.errors):
            return
        kept = [
            form.cleaned_data
            for form in self.forms
            if form.cleaned_data and not form.cleaned_data.get("DELETE")
        ]
        positions = [data["position"] for data in kept]
        duplicates = sorted({position for position in positions if positions.count(position) > 1})
        if duplicates:
            raise ValidationError(
                f"Two steps share position {', '.join(map(str, duplicates))}: give each step its own."
            )
        super().clean()
        if self.instance.enabled or not self.instance.pk:
            ordered = sorted(kept, key=lambda data: data["position"])
            Recipe.validate_steps([data["service"] for data in ordered])


class RecipeStepInline(admin.TabularInline):
    model = RecipeStep
    formset = RecipeStepFormSet
    extra = 0
    min_num = 1
    ordering = ["position"]
    fields = ["position", "service"]
    autocomplete_fields = []


@admin.register(Recipe)
class RecipeAdmin(admin.ModelAdmin):
    list_display = ["name", "enabled", "step_list", "updated_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "description"]
    inlines = [RecipeStepInline]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("steps__service")

    @admin.display(description="steps")
    def step_list(self, recipe):
        steps = sorted(recipe.steps.all(), key=lambda step: step.position)
        return " → ".join(step.service.name for step in steps)
