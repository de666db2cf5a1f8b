"""Rows that hot paths read, as they read them: live, but at most CAO_REGISTRY_CACHE_S old.

Every job creation reads its recipe, and every step its service and its
owner's share weight, several times; reading the rows each time cost a
handful of queries per step. Edits made in the admin apply within the
cache's age.
"""

import logging
import threading
import time

from django.conf import settings
from django.db import DatabaseError

logger = logging.getLogger(__name__)

_entries = {}
_lock = threading.Lock()


def cached(key, load, *, clock=time.monotonic):
    """``load()``'s value for ``key``, reloaded once it is older than the setting allows.

    While the database cannot be reached, the last value read is used: a
    worker finishing a step during a PostgreSQL restart still knows which
    queue the next step goes to.
    """
    now = clock()
    entry = _entries.get(key)
    if entry is not None and now - entry[0] < settings.CAO_REGISTRY_CACHE_S:
        return entry[1]
    try:
        value = load()
    except DatabaseError:
        if entry is None:
            raise
        logger.warning("Registry unreachable; using %s as read %.0f s ago.", key, now - entry[0])
        return entry[1]
    with _lock:
        _entries[key] = (now, value)
    return value


def forget():
    """Drop every entry: the next read of each key goes to the database."""
    with _lock:
        _entries.clear()
