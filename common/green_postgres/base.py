"""PostgreSQL through django-db-geventpool, with at most MAX_CONNS connections per process.

The library's pool decides to open a connection when fewer than MAX_CONNS
exist, then opens it; with psycopg2 made cooperative the opening yields, so a
burst of greenlets all pass the check before any connection is counted (88
connections from one worker given 330 steps at once, until PostgreSQL
refused clients). A semaphore taken before a connection is handed out and
given back when it returns to the pool (or is discarded) makes the bound
hold: a greenlet beyond it waits for a connection instead of opening one.

Connections handed out are not probed with a query (see check_usable).
"""

import psycopg2
from django_db_geventpool.backends.postgresql_psycopg2 import base
from gevent.lock import BoundedSemaphore


class BoundedConnectionPool(base.PostgresConnectionPool):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_out = BoundedSemaphore(self.maxsize)

    def check_usable(self, connection):
        # The library sends SELECT 1 each time a connection is handed out: two
        # or three round trips per step. As with thread workers' persistent
        # connections (no CONN_HEALTH_CHECKS), a connection that PostgreSQL
        # dropped fails once, is discarded, and the step's work is retried.
        if connection.closed:
            raise psycopg2.InterfaceError("connection already closed")

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
            # PostgreSQL dropped it (a restart, most likely): so it probably
            # dropped the idle ones too. Close those (as the library does),
            # and stop counting this one (which the library forgets to do).
            connection, self.connection = self.connection, None
            self.pool.discard(connection)
            self.pool.close()
        else:
            super()._close()
