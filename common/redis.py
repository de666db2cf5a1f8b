"""One Redis client (and connection pool) per process for leases and markers."""

import threading

import redis
from django.conf import settings

_clients = {}
_lock = threading.Lock()


def get_redis():
    """The process-wide client for ``settings.REDIS_URL``; safe to share across threads."""
    url = settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        with _lock:
            client = _clients.get(url)
            if client is None:
                client = redis.Redis.from_url(
                    url,
                    socket_connect_timeout=settings.CAO_REDIS_TIMEOUT_S,
                    socket_timeout=settings.CAO_REDIS_TIMEOUT_S,
                    health_check_interval=30,
                    decode_responses=True,
                )
                _clients[url] = client
    return client
