"""Changes to API keys beyond the admin's form: rotating a key's webhook signing secret."""

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from api_keys.models import ApiKey, new_webhook_secret


def webhook_secret_rotate(*, api_key_id, now=None):
    """Give the key a new signing secret; the old one keeps signing for CAO_WEBHOOK_SECRET_GRACE_S.

    Returns the key as saved. Rotating again within the grace period drops
    the oldest secret: only the two newest ever sign.
    """
    now = now or timezone.now()
    with transaction.atomic():
        api_key = ApiKey.objects.select_for_update().get(pk=api_key_id)
        api_key.previous_webhook_secret = api_key.webhook_secret
        api_key.previous_webhook_secret_until = now + timedelta(seconds=settings.CAO_WEBHOOK_SECRET_GRACE_S)
        api_key.webhook_secret = new_webhook_secret()
        api_key.save(update_fields=["webhook_secret", "previous_webhook_secret", "previous_webhook_secret_until"])
    return api_key
