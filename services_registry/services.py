"""Changes to the registry that are more than saving one form."""

import itertools

from django.db import IntegrityError, transaction

from services_registry.models import Recipe, RecipeStep

COPY_SUFFIX = "_copy"


def copy_names(name, *, max_length):
    """Candidate names for a copy of ``name``: ``<name>_copy``, ``<name>_copy2``, ..."""
    for number in itertools.count(1):
        suffix = COPY_SUFFIX if number == 1 else f"{COPY_SUFFIX}{number}"
        yield name[: max_length - len(suffix)] + suffix


def recipe_duplicate(*, recipe):
    """Copy ``recipe`` and its steps under the first free copy name; the copy starts disabled."""
    max_length = Recipe._meta.get_field("name").max_length
    stem = recipe.name[: max_length - len(COPY_SUFFIX) - 4]
    taken = set(Recipe.objects.filter(name__startswith=stem).values_list("name", flat=True))
    steps = list(recipe.steps.order_by("position"))
    for name in copy_names(recipe.name, max_length=max_length):
        if name in taken:
            continue
        try:
            with transaction.atomic():
                copy = Recipe.objects.create(name=name, description=recipe.description, enabled=False)
                RecipeStep.objects.bulk_create(
                    RecipeStep(recipe=copy, position=step.position, service_id=step.service_id) for step in steps
                )
        except IntegrityError:
            if not Recipe.objects.filter(name=name).exists():
                raise
            # Another duplicate took this name between the lookup and the insert.
            taken.add(name)
            continue
        return copy
