"""Backoff while the database is unavailable, for work whose only copy is in memory."""

import logging
import time

from django.conf import settings
from django.db import close_old_connections

logger = logging.getLogger(__name__)


class DatabaseRetry:
    """Backoff while the database is unavailable, up to CAO_RECORD_RETRY_S.

    For work whose only copy is in memory (a call's result, a claim that may
    have been stored): call ``wait_or_raise`` in the ``except`` of each try.
    """

    def __init__(self, doing, *, sleep=time.sleep):
        self.doing = doing
        self.sleep = sleep
        self.deadline = time.monotonic() + settings.CAO_RECORD_RETRY_S
        self.delay = 0.2

    def wait_or_raise(self):
        if time.monotonic() >= self.deadline:
            logger.error("Giving up %s: database unavailable.", self.doing)
            raise
        logger.warning("Database unavailable while %s; retrying in %.1f s.", self.doing, self.delay, exc_info=True)
        close_old_connections()
        self.sleep(self.delay)
        self.delay = min(self.delay * 2, 5.0)
