"""Reachability of PostgreSQL and Redis, for start-up checks and readiness.

Start-up code calls ``require_backends()`` so a process that cannot reach a
backend stops at once with a message naming the URL it tried (password
hidden), instead of failing later on the first request.
"""

from urllib.parse import urlsplit, urlunsplit

import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection
from django.db.utils import InterfaceError, OperationalError

from common.redis import get_redis


# Failures of the gateway's own backends, which come back by themselves: a
# request answers 503, a step message is retried, a result being recorded
# waits for the database.
DATABASE_ERRORS = (OperationalError, InterfaceError)
BACKEND_ERRORS = (*DATABASE_ERRORS, redis.ConnectionError, redis.TimeoutError)


class BackendUnreachable(ImproperlyConfigured):
    """Raised at start-up when PostgreSQL or Redis cannot be reached."""


def redact_url(url):
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    userinfo = f"{parts.username}:***" if parts.username else ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{netloc}"))


def check_database():
    """None when PostgreSQL answers, else a sentence saying what failed."""
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except OperationalError as exc:
        connection.close()
        return (
            f"PostgreSQL is not reachable at {redact_url(settings.DATABASE_URL)}: "
            f"{str(exc).strip().splitlines()[-1]}"
        )
    return None


def check_redis():
    """None when Redis answers, else a sentence saying what failed."""
    # The process-wide client: a readiness probe every few seconds would
    # otherwise open (and close) a connection each time.
    try:
        get_redis().ping()
    except redis.RedisError as exc:
        return f"Redis is not reachable at {redact_url(settings.REDIS_URL)}: {exc}"
    return None


def require_backends():
    """Raise ``BackendUnreachable`` naming every backend that does not answer."""
    problems = [problem for problem in (check_database(), check_redis()) if problem]
    if problems:
        raise BackendUnreachable(
            "\n".join(problems)
            + "\nStart the missing service (`make run` starts local ones it finds installed) "
            "or point DATABASE_URL / REDIS_URL at a running one."
        )
