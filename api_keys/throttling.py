"""Per-client request throttling (DRF), with rates read from settings at call time."""

from django.conf import settings
from rest_framework.throttling import SimpleRateThrottle

from api_keys.models import ApiKey


class ClientRateThrottle(SimpleRateThrottle):
    """Limits each client: an API key, else a staff user, else an IP address."""

    scope = "client"

    def __init__(self):
        # SimpleRateThrottle reads its rate once at import; read it per request
        # instead, so settings (and tests) can change it.
        pass

    def allow_request(self, request, view):
        self.rate = settings.CAO_THROTTLE_RATES.get(self.scope)
        if not self.rate or self.rate.lower() == "none":
            return True
        self.num_requests, self.duration = self.parse_rate(self.rate)
        return super().allow_request(request, view)

    def get_cache_key(self, request, view):
        user = request.user
        if isinstance(user, ApiKey):
            ident = f"key:{user.pk}"
        elif getattr(user, "is_authenticated", False):
            ident = f"user:{user.pk}"
        else:
            ident = f"ip:{self.get_ident(request)}"
        return self.cache_format % {"scope": self.scope, "ident": ident}


class JobCreateRateThrottle(ClientRateThrottle):
    """A lower limit on starting jobs, which costs downstream calls."""

    scope = "job_create"

    def allow_request(self, request, view):
        if request.method != "POST":
            return True
        return super().allow_request(request, view)
