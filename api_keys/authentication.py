"""DRF authentication by API key, and the permission every job endpoint uses."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from api_keys.models import ApiKey

# last_used_at is refreshed at most this often, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def raw_key_from(request):
    """The key sent as ``Authorization: Api-Key <key>`` or ``X-API-Key``, or None."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "api-key" and value.strip():
        return value.strip()
    value = request.META.get("HTTP_X_API_KEY", "").strip()
    return value or None


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticates ``Authorization: Api-Key <key>`` or ``X-API-Key: <key>``."""

    def authenticate(self, request):
        raw_key = raw_key_from(request)
        if raw_key is None:
            return None
        prefix = ApiKey.prefix_of(raw_key)
        api_key = ApiKey.objects.filter(prefix=prefix, is_active=True).first() if prefix else None
        if api_key is None or not api_key.matches(raw_key):
            raise exceptions.AuthenticationFailed("Invalid or inactive API key.")
        now = timezone.now()
        if api_key.last_used_at is None or api_key.last_used_at < now - LAST_USED_RESOLUTION:
            ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION), pk=api_key.pk).update(last_used_at=now)
        return api_key, api_key

    def authenticate_header(self, request):
        return "Api-Key"


class IsApiClient(permissions.BasePermission):
    """An API key, a staff session, or anonymous access when explicitly enabled."""

    message = "Send an API key as 'Authorization: Api-Key <key>' or 'X-API-Key: <key>'."

    def has_permission(self, request, view):
        user = request.user
        if isinstance(user, ApiKey):
            return True
        if getattr(user, "is_staff", False) and user.is_active:
            return True
        return settings.CAO_ALLOW_ANONYMOUS


def caller_scope(request):
    """``(owner, is_staff)`` of the request: whose jobs it may see and act on."""
    user = request.user
    if isinstance(user, ApiKey):
        return user, user.is_staff
    if getattr(user, "is_staff", False):
        return None, True
    return None, False
