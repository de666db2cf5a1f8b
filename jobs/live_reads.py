"""The database reads of live subscribers (WebSocket consumers, event streams), side by side on a pool of their own.

Channels' ``database_sync_to_async`` is thread-sensitive: outside a
request, every call of the process runs on asgiref's one shared thread. A
burst of sockets then opens one read at a time, each waiting behind all the
others' (and, on a busy API, behind its HTTP threads for the GIL), and a
socket's pushes wait until its own replay is sent. These reads depend on
nothing but the database: they run on CAO_LIVE_READ_THREADS threads
instead, each keeping its connection as the HTTP threads do, so the
connections a process holds stay bounded by that setting.
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from channels.db import DatabaseSyncToAsync
from django.conf import settings
from django.db import connections

_lock = threading.Lock()
_pool = None  # this process's _Pool; a forked process builds its own


class _Pool:
    def __init__(self, size):
        self.pid = os.getpid()
        self.threads = 0  # started so far (a pool starts them as work arrives)
        self.executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="live-read", initializer=self._started)

    def _started(self):
        with _lock:
            self.threads += 1

    def close(self):
        """Stop the threads, each closing the connection it kept."""
        with _lock:
            size = self.threads
        if size:
            # Each task waits for all the others, so every thread runs one.
            barrier = threading.Barrier(size)

            def close_own():
                try:
                    barrier.wait(timeout=10)
                finally:
                    connections.close_all()

            for _ in range(size):
                self.executor.submit(close_own)
        self.executor.shutdown(wait=True)


def live_read(function):
    """``function`` (sync, reads the database) as a coroutine function that runs on the live readers' pool."""
    return DatabaseSyncToAsync(function, thread_sensitive=False, executor=_current_pool().executor)


def _current_pool():
    global _pool
    with _lock:
        if _pool is None or _pool.pid != os.getpid():
            _pool = _Pool(settings.CAO_LIVE_READ_THREADS)
        return _pool


def shut_down():
    """Stop this process's pool, closing its connections; the next read starts a new one."""
    global _pool
    with _lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()
