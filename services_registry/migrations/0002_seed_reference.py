"""Seed the brief's five services and two recipes."""

from django.db import migrations

from services_registry import reference


def seed(apps, schema_editor):
    reference.seed(
        apps.get_model("services_registry", "Service"),
        apps.get_model("services_registry", "Recipe"),
        apps.get_model("services_registry", "RecipeStep"),
    )


def unseed(apps, schema_editor):
    Recipe = apps.get_model("services_registry", "Recipe")
    Service = apps.get_model("services_registry", "Service")
    Recipe.objects.filter(name__in=[name for name, _, _ in reference.RECIPES]).delete()
    Service.objects.filter(name__in=[row[0] for row in reference.SERVICES]).delete()


class Migration(migrations.Migration):
    dependencies = [("services_registry", "0001_initial")]

    operations = [migrations.RunPython(seed, unseed)]
