"""PostgreSQL through django-db-geventpool, with at most MAX_CONNS connections per process.

The library's pool decides to open a connection when fewer than MAX_CONNS
exist, then opens it; with psycopg2 made cooperative the opening yields, so a
burst of greenlets all pass the check before any connection is counted (88
connections from one worker given 330 steps at once, until PostgreSQL
refused clients). A semaphore taken before a connection is handed out and
given back when it returns to the pool (or is discarded) makes the bound
hold: a greenlet beyond it waits for a connection instead of opening one.
"""

from django_db_geventpool.backends.postgresql_psycopg2 import base
from gevent.lock import BoundedSemaphore


class BoundedConnectionPool(base.PostgresConnectionPool):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_out = BoundedSemaphore(self.maxsize)

    def get(self):
        self.checked_out.acquire()
        try:
            return super().get()
        except BaseException:
            self.checked_out.release()
            raise

    def put(self, item):
        try:
            super().put(item)
        finally:
            self.checked_out.release()

    def discard(self, item):
        """A connection that broke: forget it and free its place."""
        try:
            self._conns.discard(item)
        finally:
            self.checked_out.release()


class DatabaseWrapper(base.DatabaseWrapper):
    pool_class = BoundedConnectionPool

    def _close(self):
        if self.connection.closed:
            # The library would close the idle connections and keep counting
            # this one; only this one is gone.
            connection, self.connection = self.connection, None
            self.pool.discard(connection)
        else:
            super()._close()
