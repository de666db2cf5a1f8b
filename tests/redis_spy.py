"""Real Redis connections that watch what the gateway sends (for tests that count or order requests)."""

from contextlib import contextmanager

import dramatiq

from common.redis import get_redis


@contextmanager
def connection_class(cls):
    """New connections of the gateway's and the broker's Redis pools are ``cls`` for the block."""
    pools = [get_redis().connection_pool, dramatiq.get_broker().client.connection_pool]
    originals = [pool.connection_class for pool in pools]
    for pool in pools:
        pool.disconnect()
        pool.reset()  # drop idle connections so new ones use ``cls``
        pool.connection_class = cls
    try:
        yield cls
    finally:
        for pool, original in zip(pools, originals):
            pool.disconnect()
            pool.reset()
            pool.connection_class = original
