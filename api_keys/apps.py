from django.apps import AppConfig


class ApiKeysConfig(AppConfig):
    name = "api_keys"
    verbose_name = "API keys"

    def ready(self):
        # Registers the OpenAPI description of the API key header.
        from api_keys import schema  # noqa: F401
