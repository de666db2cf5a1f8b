"""Green workers: a call in flight holds a greenlet, not an OS thread or a database connection.

A worker started with ``rundramatiq --use-gevent`` runs under
``dramatiq-gevent``, which monkey-patches the standard library before Django
loads. Its worker "threads" are then greenlets (cheap: thousands per
process), and a downstream call that waits on its socket lets the others
run, so a service's concurrency limit, not a thread count, bounds the calls
in flight.

Two things keep such a worker from needing a database connection per call:

- psycopg2 is made cooperative (psycogreen), so a query waits like a socket;
- connections come from a small per-process pool (django-db-geventpool,
  bounded exactly by common.green_postgres,
  ``CAO_WORKER_DB_CONNECTIONS``), and the engine gives its connection back
  for the duration of the call (``release_database_connection``).

Everything else (requests, redis-py, the lease keeper's thread) is green
through the monkey-patching. Crash safety does not change: it rests on
leases, heartbeats and fencing tokens, not on threads.
"""

import asyncio
import concurrent.futures
import logging
import sys
import threading

POOLED_ENGINE = "common.green_postgres"


def active() -> bool:
    """Whether this process runs under gevent's monkey-patching (a green worker)."""
    monkey = sys.modules.get("gevent.monkey")
    return bool(monkey and monkey.is_module_patched("socket"))


def pooled_database(database: dict, *, max_connections: int) -> dict:
    """``database`` (a DATABASES entry) served from a bounded green pool.

    Django's own persistent connections are per thread, so per greenlet
    here: without the pool, a worker would hold one per call in flight.
    """
    options = {**database.get("OPTIONS", {}), "MAX_CONNS": max_connections, "REUSE_CONNS": max_connections}
    return {**database, "ENGINE": POOLED_ENGINE, "CONN_MAX_AGE": 0, "OPTIONS": options}


def prepare() -> None:
    """Ready a green process; called by its settings, before any connection or logging config.

    - psycopg2 waits through gevent's hub (psycogreen), so a query lets the
      other greenlets run;
    - logging handlers lock with real locks. The event publisher's OS thread
      logs too (a push that failed while Redis was down), and a gevent lock
      taken from another OS thread deadlocked every greenlet that logged
      after it. A real lock is safe between greenlets here: a handler never
      yields while it writes.
    """
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()
    _log_with_real_locks()


def _log_with_real_locks():
    from gevent.monkey import get_original

    real_rlock = get_original("_thread", "RLock")  # C, never gevent's

    def create_lock(handler):
        handler.lock = real_rlock()
        logging._register_at_fork_reinit_lock(handler)

    logging.Handler.createLock = create_lock
    logging._lock = real_rlock()
    for reference in list(logging._handlerList):
        handler = reference()
        if handler is not None:
            handler.lock = real_rlock()


def new_event_loop():
    """An asyncio event loop that can run in an OS thread of its own, in a green process too.

    There, the patched selectors would wait on the gevent hub of a thread
    that never runs it (the loop spins at 100 % of a core), and the default
    executor (for getaddrinfo) would start greenlets that never run. The
    loop gets the original epoll selector and an executor that runs calls
    inline, in the loop's own thread.
    """
    if not active():
        return asyncio.new_event_loop()
    from gevent.monkey import get_original

    loop = asyncio.SelectorEventLoop(get_original("selectors", "DefaultSelector")())
    loop.set_default_executor(_InlineExecutor())
    return loop


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    # A ThreadPoolExecutor in name only (asyncio insists): it starts no thread.
    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:
            future.set_exception(error)
        return future


def start_os_thread(target, *args, name):
    """Run ``target(*args)`` in a real OS thread, even in a green process.

    For an asyncio event loop: asyncio keeps "the running loop" per OS
    thread, not per greenlet. A loop run by a greenlet would make every
    other greenlet of the process look like async code to Django, which
    then swaps their database connections for per-coroutine ones and
    refuses the ORM (SynchronousOnlyOperation).
    """
    if active():
        from gevent.monkey import get_original

        get_original("_thread", "start_new_thread")(target, args)
    else:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()


def take_database_connection() -> None:
    """Have this thread's (greenlet's) database connection in hand now: wait for one of the pool's if need be.

    Called before a write stamps its events, so that their ``ts`` is when
    the write could run, not when it started waiting behind the pool's other
    users: a green worker under load may wait there for hundreds of
    milliseconds, which its subscribers would see as delivery lag. A thread
    worker's persistent connection makes this a no-op. A database that
    cannot be reached is left to the write's own retry.
    """
    from django.db import DatabaseError, connection

    try:
        connection.ensure_connection()
    except DatabaseError:
        pass


def release_database_connection() -> None:
    """Give this greenlet's database connection back to the pool (no-op outside green workers).

    The next query takes one from the pool again. A thread worker keeps its
    persistent connection instead: reconnecting would cost more than it saves.
    """
    if active():
        from django.db import connection

        connection.close()
