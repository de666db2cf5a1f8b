"""Read-only queries over the registry."""

from dataclasses import dataclass

from common.row_cache import cached
from services_registry.models import Recipe, Service


@dataclass(frozen=True)
class RecipeSnapshot:
    """What a new job needs of its recipe: whether it may run, and its steps in order."""

    name: str
    enabled: bool
    steps: tuple  # service names, in order
    disabled_services: tuple


def service_list(*, enabled_only=False):
    services = Service.objects.all()
    if enabled_only:
        services = services.filter(enabled=True)
    return list(services)


def service_get(name):
    """The service named ``name``, or None."""
    return Service.objects.filter(name=name).first()


def recipe_list(*, enabled_only=True):
    recipes = Recipe.objects.prefetch_related("steps__service")
    if enabled_only:
        recipes = recipes.filter(enabled=True)
    return list(recipes)


def recipe_get(name):
    """The recipe named ``name`` with its steps loaded, or None."""
    return Recipe.objects.prefetch_related("steps__service").filter(name=name).first()


def recipe_steps(recipe):
    """The recipe's services in step order."""
    return [step.service for step in sorted(recipe.steps.all(), key=lambda step: step.position)]


def service_live(name):
    """The service named ``name`` (or None), as cached for hot paths.

    One query reads every service: a worker whose steps touch several
    services reads the registry once per cache period, not once per service.
    """
    return cached(("services",), lambda: {service.name: service for service in Service.objects.all()}).get(name)


def recipe_snapshot(name):
    """The recipe named ``name`` as a RecipeSnapshot (or None), as cached for hot paths."""

    def load():
        recipe = recipe_get(name)
        if recipe is None:
            return None
        services = recipe_steps(recipe)
        return RecipeSnapshot(
            name=recipe.name,
            enabled=recipe.enabled,
            steps=tuple(service.name for service in services),
            disabled_services=tuple(service.name for service in services if not service.enabled),
        )

    return cached(("recipe", name), load)
