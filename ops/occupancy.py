"""Live slot usage of services, read from the limiter; Redis being down is shown, not raised."""

import logging

from redis.exceptions import RedisError

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
