from django.apps import AppConfig


class ServicesRegistryConfig(AppConfig):
    name = "services_registry"
    verbose_name = "Service registry"
