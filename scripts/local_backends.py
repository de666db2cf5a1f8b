"""Make sure PostgreSQL and Redis answer before `make run` / `make test`.

For a local server (127.0.0.1 / localhost) that is installed but stopped, it
starts it; when it is not installed, it says what to install. It then creates
the database named in DATABASE_URL when missing. It reads the URLs from the
project settings, so the defaults live in one place.

With ``--rabbitmq`` (what `make test` passes) it does the same for the
RabbitMQ the broker tests use (CAO_TEST_RABBITMQ_URL): started with
``rabbitmq-server -detached`` when installed but stopped. A RabbitMQ that is
not installed is reported, not fatal: the broker tests then skip, or fail
under CI=true (tests/requirements.py).
"""

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cao_project.settings")
# Only the URLs are read here; a placeholder key lets settings import with DEBUG off.
os.environ.setdefault("SECRET_KEY", "local-backends-check")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
# The broker tests' RabbitMQ (tests/conftest.py reads the same variable).
RABBITMQ_TEST_URL = os.environ.get("CAO_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
# RabbitMQ (Erlang) takes several seconds to boot; a reachability check is short.
RABBITMQ_START_SECONDS = 60
RABBITMQ_CHECK_TIMEOUT_S = 2.0


class Problem(Exception):
    """A backend cannot be made available; the message says what to do."""


def port_open(host, port, timeout=1.0):
    try:
        with socket.create_connection((host or "127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host, port, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if port_open(host, port):
            return True
        time.sleep(0.3)
    return False


def run(command):
    print(f"  $ {' '.join(command)}", flush=True)
    return subprocess.run(command, capture_output=True, text=True)


def start_postgres():
    if shutil.which("pg_lsclusters") and shutil.which("pg_ctlcluster"):
        clusters = run(["pg_lsclusters", "--no-header"]).stdout.split()
        if len(clusters) >= 2:
            version, name = clusters[0], clusters[1]
            result = run(["pg_ctlcluster", "--skip-systemctl-redirect", version, name, "start"])
            if result.returncode != 0:
                raise Problem(f"pg_ctlcluster could not start PostgreSQL: {result.stderr.strip()}")
            return
    if shutil.which("brew"):
        run(["brew", "services", "start", "postgresql"])
        return
    if shutil.which("systemctl"):
        run(["systemctl", "start", "postgresql"])
        return
    raise Problem(
        "PostgreSQL is not installed (no pg_ctlcluster, brew or systemctl found). Install it "
        "(Debian/Ubuntu: `sudo apt install postgresql`; macOS: `brew install postgresql`) or "
        "set DATABASE_URL to a server you can reach."
    )


def start_redis(port):
    if not shutil.which("redis-server"):
        raise Problem(
            "Redis is not installed. Install it (Debian/Ubuntu: `sudo apt install redis-server`; "
            "macOS: `brew install redis`) or set REDIS_URL to a server you can reach."
        )
    result = run(
        [
            "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "--port", str(port),
            "--save", "", "--appendonly", "no",
        ]
    )
    if result.returncode != 0:
        raise Problem(f"redis-server could not start: {result.stderr.strip() or result.stdout.strip()}")


def start_rabbitmq():
    result = run(["rabbitmq-server", "-detached"])
    if result.returncode != 0:
        raise Problem(f"rabbitmq-server could not start: {result.stderr.strip() or result.stdout.strip()}")


def rabbitmq_login_problem(url, timeout_s=RABBITMQ_CHECK_TIMEOUT_S):
    """Why an AMQP login at ``url`` fails, or None when it succeeds."""
    import pika

    parameters = pika.URLParameters(url)
    parameters.connection_attempts, parameters.retry_delay = 1, 0
    parameters.socket_timeout = parameters.blocked_connection_timeout = timeout_s
    try:
        pika.BlockingConnection(parameters).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
        return f"it refused the login ({exc.__class__.__name__}); fix the user, password or vhost in CAO_TEST_RABBITMQ_URL"
    except pika.exceptions.AMQPError as exc:
        return f"no AMQP handshake ({exc.__class__.__name__}: {exc})"
    return None


def ensure_rabbitmq(url, *, which=shutil.which, start=start_rabbitmq, login_problem=rabbitmq_login_problem,
                    start_seconds=RABBITMQ_START_SECONDS):
    """Start a local RabbitMQ that is installed but stopped; return a warning when it is not installed."""
    from common.backends import redact_url

    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    if not port_open(host, port, timeout=RABBITMQ_CHECK_TIMEOUT_S):
        if host not in LOCAL_HOSTS:
            raise Problem(f"RabbitMQ at {redact_url(url)} does not answer; start it or fix CAO_TEST_RABBITMQ_URL.")
        if not which("rabbitmq-server"):
            return (
                f"RabbitMQ is not installed (no rabbitmq-server) and nothing answers at {redact_url(url)}: "
                "the broker tests will be skipped, and fail under CI=true. Install it "
                "(Debian/Ubuntu: `sudo apt install rabbitmq-server`) or set CAO_TEST_RABBITMQ_URL."
            )
        print(f"RabbitMQ is not running on {host}:{port}; starting it.", flush=True)
        start()
        if not wait_for_port(host, port, start_seconds):
            raise Problem(f"RabbitMQ did not start listening on {host}:{port} within {start_seconds} s.")
    problem = login_problem(url)
    if problem:
        raise Problem(f"RabbitMQ at {redact_url(url)} answers but {problem}.")
    print(f"RabbitMQ ok: {redact_url(url)}", flush=True)
    return None


def ensure_postgres(database_url):
    from common.backends import redact_url

    parts = urlsplit(database_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    if not port_open(host, port):
        if host not in LOCAL_HOSTS:
            raise Problem(f"PostgreSQL at {redact_url(database_url)} does not answer; start it or fix DATABASE_URL.")
        print(f"PostgreSQL is not running on {host}:{port}; starting it.", flush=True)
        start_postgres()
        if not wait_for_port(host, port, 30):
            raise Problem(f"PostgreSQL did not start listening on {host}:{port} within 30 s.")
    ensure_database(database_url)
    print(f"PostgreSQL ok: {redact_url(database_url)}", flush=True)


def ensure_database(database_url):
    import psycopg2
    from psycopg2 import sql

    from common.backends import redact_url

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    params = {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": parts.username or os.environ.get("USER", "postgres"),
        "password": parts.password,
        "connect_timeout": 5,
    }
    last_error = None
    for maintenance_db in ("postgres", "template1"):
        try:
            conn = psycopg2.connect(dbname=maintenance_db, **params)
            break
        except psycopg2.OperationalError as exc:
            last_error = exc
    else:
        raise Problem(
            f"Cannot log in to PostgreSQL at {redact_url(database_url)}: "
            f"{str(last_error).strip()}. Set DATABASE_URL with a user that may log in, "
            "e.g. postgresql://USER:PASSWORD@127.0.0.1:5432/cao"
        )
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        if cursor.fetchone() is None:
            print(f"Creating database {name!r}.", flush=True)
            cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    conn.close()


def ensure_redis(redis_url):
    import redis

    from common.backends import redact_url

    parts = urlsplit(redis_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if not port_open(host, port):
        if host not in LOCAL_HOSTS:
            raise Problem(f"Redis at {redact_url(redis_url)} does not answer; start it or fix REDIS_URL.")
        print(f"Redis is not running on {host}:{port}; starting it.", flush=True)
        start_redis(port)
        if not wait_for_port(host, port, 15):
            raise Problem(f"Redis did not start listening on {host}:{port} within 15 s.")
    try:
        redis.Redis.from_url(redis_url, socket_timeout=5).ping()
    except redis.RedisError as exc:
        raise Problem(f"Redis at {redact_url(redis_url)} refused a PING: {exc}") from None
    print(f"Redis ok: {redact_url(redis_url)}", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rabbitmq", action="store_true", help="also the RabbitMQ of the broker tests")
    options = parser.parse_args(argv)
    from django.conf import settings

    try:
        ensure_postgres(settings.DATABASE_URL)
        ensure_redis(settings.REDIS_URL)
        warning = ensure_rabbitmq(RABBITMQ_TEST_URL) if options.rabbitmq else None
    except Problem as problem:
        print(f"\nerror: {problem}", file=sys.stderr)
        return 1
    if warning:
        print(f"\nwarning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
