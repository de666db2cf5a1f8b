"""Read-only queries over the registry."""

from services_registry.models import Recipe, Service


def service_list(*, enabled_only=False):
    services = Service.objects.all()
    if enabled_only:
        services = services.filter(enabled=True)
    return list(services)


def services_by_name(names):
    """Services for ``names`` as a dict; names without a service are absent."""
    return {service.name: service for service in Service.objects.filter(name__in=set(names))}


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
