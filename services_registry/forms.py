"""Forms that validate registry edits the way the models do (used by the admin)."""

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from services_registry.models import Recipe, Service


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
