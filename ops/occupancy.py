"""Live slot usage of services, read from the limiter; Redis being down is shown, not raised."""

import logging

from redis.exceptions import RedisError

from api_keys.models import ApiKey
from orchestration.per_process import get_limiter

logger = logging.getLogger(__name__)


def read_occupancies(services, *, limiter=None):
    """``{service name: Occupancy, or None when Redis cannot be read}``, one read per service."""
    limiter = limiter or get_limiter()
    occupancies = {}
    for service in services:
        try:
            occupancies[service.name] = limiter.occupancy(service.name)
        except RedisError as exc:
            logger.warning("Cannot read the occupancy of %s from Redis: %s", service.name, exc)
            # One timeout per page is enough: the next services would wait as long.
            return {**occupancies, **{other.name: None for other in services if other.name not in occupancies}}
    return occupancies


def key_names(tenants):
    """``{tenant: the name of its API key}`` for a line's tenants ("" is jobs without a key)."""
    tenants = list(tenants)
    ids = [int(tenant) for tenant in tenants if tenant.isdigit()]
    names = dict(ApiKey.objects.filter(pk__in=ids).values_list("pk", "name"))

    def name(tenant):
        if not tenant:
            return "no key"
        return names.get(int(tenant), f"deleted key {tenant}") if tenant.isdigit() else tenant

    return {tenant: name(tenant) for tenant in tenants}
