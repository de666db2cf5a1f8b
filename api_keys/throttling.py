"""Per-client request throttling (DRF), atomic across threads, processes and hosts.

DRF's ``SimpleRateThrottle`` reads a client's history from the cache, then
writes it back: concurrent requests read the same history and all pass (32
threads got 88 answers under a limit of 60). Here each decision is one Lua
script in Redis (``lua/throttle.lua``), so the limit holds under any
concurrency. Rates are DRF's syntax (``"600/min"``), read from settings at
call time. When Redis is unavailable requests are let through (and logged):
throttling protects the gateway, it must not take it down.
"""

import logging
import time
from pathlib import Path

import redis
from django.conf import settings
from rest_framework.throttling import BaseThrottle

from api_keys.models import ApiKey
from common.redis import get_redis

logger = logging.getLogger(__name__)

SCRIPT = (Path(__file__).resolve().parent / "lua" / "throttle.lua").read_text()
KEY = "cao:throttle:{scope}:{ident}"
# An outage is logged at most this often per process, not once per request.
OUTAGE_LOG_INTERVAL_S = 30.0

_scripts = {}
_last_outage_log = [0.0]


PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rate(rate):
    """``(requests, seconds)`` of a rate such as ``"600/min"``, or None when it is off."""
    if not rate or rate.strip().lower() == "none":
        return None
    count, _, period = rate.partition("/")
    return int(count), PERIODS[period.strip()[:1]]


def _script(client):
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(SCRIPT)
    return script


class ClientRateThrottle(BaseThrottle):
    """Limits each client: an API key, else a signed-in user, else an IP address.

    A request is checked against every budget ``scopes_for`` names, in one
    round trip: it passes if all allow it, and a refused request spends none.
    """

    scopes = ("client",)

    def __init__(self):
        self.wait_s = None

    def scopes_for(self, request):
        return self.scopes

    def allow_request(self, request, view):
        budgets = [
            (scope, rate)
            for scope in self.scopes_for(request)
            if (rate := parse_rate(settings.CAO_THROTTLE_RATES.get(scope))) is not None
        ]
        if not budgets:
            return True
        ident = self.client_ident(request)
        keys, args = [], []
        for scope, (requests, seconds) in budgets:
            period_ms = seconds * 1000
            keys.append(KEY.format(scope=scope, ident=ident))
            args.extend((period_ms / requests, period_ms))
        try:
            allowed, wait_ms = _script(get_redis())(keys=keys, args=args)
        except redis.RedisError:
            _log_outage()
            return True
        if int(allowed):
            return True
        self.wait_s = int(wait_ms) / 1000
        return False

    def wait(self):
        return self.wait_s

    def client_ident(self, request):
        user = request.user
        if isinstance(user, ApiKey):
            return f"key:{user.pk}"
        if getattr(user, "is_authenticated", False):
            return f"user:{user.pk}"
        return f"ip:{self.get_ident(request)}"


class JobCreateRateThrottle(ClientRateThrottle):
    """The client's budget, and on POST a lower one for starting jobs, which costs downstream calls."""

    def scopes_for(self, request):
        return ("client", "job_create") if request.method == "POST" else ("client",)


def _log_outage():
    now = time.monotonic()
    if now - _last_outage_log[0] >= OUTAGE_LOG_INTERVAL_S:
        _last_outage_log[0] = now
        logger.warning("Redis is unavailable: requests are not throttled until it is back.", exc_info=True)
