"""DRF authentication by API key, and the permission every API endpoint uses.

Callers are API keys (a client key acts on its own jobs, a staff key on all
of them), staff users' sessions (the web pages; CSRF-checked), which get
exactly the model permissions the admin grants them, or, only when
CAO_ALLOW_ANONYMOUS is on, anonymous clients.
"""

import time
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone
from rest_framework import authentication, exceptions, permissions

from api_keys.models import ApiKey, hash_key

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


# Active keys recently authenticated by this process: hash of the raw key ->
# (monotonic time read, ApiKey). Only keys that matched are kept, so the
# cache holds at most one entry per key, whatever clients send.
_recent = {}


def active_key(raw_key, *, clock=time.monotonic):
    """The active ApiKey ``raw_key`` belongs to, or None.

    Read at most every CAO_API_KEY_CACHE_S per process: a key
    deactivated or deleted in one process stops working there at once, and
    in the others within that time.
    """
    digest = hash_key(raw_key)
    now = clock()
    entry = _recent.get(digest)
    if entry is not None and now - entry[0] < settings.CAO_API_KEY_CACHE_S:
        return entry[1]
    prefix = ApiKey.prefix_of(raw_key)
    api_key = ApiKey.objects.filter(prefix=prefix, is_active=True).first() if prefix else None
    if api_key is None or not api_key.matches(raw_key):
        _recent.pop(digest, None)
        return None
    if settings.CAO_API_KEY_CACHE_S > 0:
        _recent[digest] = (now, api_key)
    return api_key


@receiver([post_save, post_delete], sender=ApiKey)
def _forget_recent_keys(**kwargs):
    _recent.clear()


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """Authenticates ``Authorization: Api-Key <key>`` or ``X-API-Key: <key>``."""

    def authenticate(self, request):
        raw_key = raw_key_from(request)
        if raw_key is None:
            return None
        api_key = active_key(raw_key)
        if api_key is None:
            raise exceptions.AuthenticationFailed("Invalid or inactive API key.")
        now = timezone.now()
        if api_key.last_used_at is None or api_key.last_used_at < now - LAST_USED_RESOLUTION:
            ApiKey.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION), pk=api_key.pk).update(last_used_at=now)
            api_key.last_used_at = now
        return api_key, api_key

    def authenticate_header(self, request):
        return "Api-Key"


def is_staff_session(user):
    """Whether ``user`` is a logged-in, active staff user (an API key is not)."""
    return (
        not isinstance(user, ApiKey)
        and getattr(user, "is_authenticated", False)
        and getattr(user, "is_active", False)
        and getattr(user, "is_staff", False)
    )


def session_has_any(user, permissions):
    """Whether ``user`` is a staff session holding at least one of ``permissions`` (as the admin grants them)."""
    return is_staff_session(user) and any(user.has_perm(permission) for permission in permissions)


class IsApiClient(permissions.BasePermission):
    """An API key; a staff session holding a permission the view names; anonymous access when enabled.

    A view lists what a session needs per method in ``session_permissions``,
    e.g. ``{"GET": ("jobs.view_job", "jobs.change_job")}`` (any one will do).
    A method it does not list is closed to sessions.
    """

    message = "Send an API key as 'Authorization: Api-Key <key>' or 'X-API-Key: <key>'."

    def has_permission(self, request, view):
        user = request.user
        if isinstance(user, ApiKey):
            return True
        if is_staff_session(user):
            method = "GET" if request.method in ("HEAD", "OPTIONS") else request.method
            needed = getattr(view, "session_permissions", {}).get(method, ())
            if session_has_any(user, needed):
                return True
            self.message = (
                f"Your account needs the {' or '.join(needed)} permission; an administrator grants it in the admin."
                if needed
                else "This endpoint takes an API key, not a session."
            )
            return False
        return settings.CAO_ALLOW_ANONYMOUS


def caller_scope(request):
    """``(owner, is_staff)`` of the request: whose jobs it may see and act on, and whether it may force.

    A staff session reaches a view only with the permission the view names
    (``IsApiClient``), and then acts as staff does.
    """
    user = request.user
    if isinstance(user, ApiKey):
        return user, user.is_staff
    if is_staff_session(user):
        return None, True
    # Anonymous clients (CAO_ALLOW_ANONYMOUS) share a key of their own, so
    # they never see the jobs of staff sessions, which have no owner.
    return ApiKey.objects.anonymous(), False
