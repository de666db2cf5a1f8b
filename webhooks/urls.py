from django.urls import path

from webhooks import apis

urlpatterns = [
    path("webhooks/secret", apis.WebhookSecretApi.as_view(), name="webhook-secret"),
]
