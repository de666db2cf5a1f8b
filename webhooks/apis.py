"""The webhooks API: a key reads its own signing secret."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from api_keys.models import ApiKey
from webhooks.errors import SecretNeedsApiKey


class WebhookSecretApi(APIView):
    """The secret that signs your webhook deliveries (Standard Webhooks, ``whsec_…``).

    Verify each delivery's ``webhook-signature`` with it. After a rotation
    (by an operator, in the admin) this returns the new secret; deliveries
    carry a signature by the previous one too for CAO_WEBHOOK_SECRET_GRACE_S.
    Only API keys have a secret: anonymous clients get 403, and sessions
    cannot call this.
    """

    # No session permission: a secret belongs to an API key.
    session_permissions = {}

    class WebhookSecretSerializer(serializers.Serializer):
        secret = serializers.CharField(help_text="whsec_ followed by the base64 of the key's random secret.")

    @extend_schema(summary="Get your webhook signing secret", responses=WebhookSecretSerializer)
    def get(self, request):
        api_key = request.user
        if not isinstance(api_key, ApiKey):
            raise SecretNeedsApiKey()
        secret = ApiKey.objects.values_list("webhook_secret", flat=True).get(pk=api_key.pk)
        return Response(self.WebhookSecretSerializer({"secret": secret}).data)
