"""Run the test suite on backends of this run's own: `python -m scripts.isolated_pytest [pytest args]`.

`make test` (and so CI) runs the suite through here. Two suites on one
machine used to share the database `test_cao` and Redis db 15, which every
test flushes: each would clobber the other. Here each run gets:

- a redis-server of its own, on a free port, gone when the run ends (unless
  ``CAO_TEST_REDIS_URL`` names one to use instead);
- database names of its own: the database of ``DATABASE_URL`` (default
  ``cao``) gets the suffix ``_r<pid>``, so pytest-django's test database and
  the end-to-end tests' databases derived from it are this run's alone.
  Databases left by runs that were killed (their pid is gone) are dropped.

Everything else (RabbitMQ for the broker tests, Chromium) is shared.
"""

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.private_servers import PrivateRedis  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/cao"
RUN_SUFFIX = re.compile(r"_r(\d+)(?:_|$)")


def run_database_url(database_url, pid):
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/") or "cao"
    return urlunsplit(parts._replace(path=f"/{name}_r{pid}"))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def drop_databases_of_dead_runs(database_url, *, alive=pid_alive):
    """Drop databases a killed run left behind (named ``..._r<pid>...`` with that pid gone); returns their names."""
    parts = urlsplit(database_url)
    base = parts.path.lstrip("/") or "cao"
    try:
        conn = psycopg2.connect(
            dbname="postgres", host=parts.hostname or "127.0.0.1", port=parts.port or 5432,
            user=parts.username or "postgres", password=parts.password, connect_timeout=5,
        )
    except psycopg2.OperationalError:
        return []  # `make test` has already said what is wrong with PostgreSQL
    conn.autocommit = True
    dropped = []
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", [f"%{base}_r%"])
            for (name,) in cursor.fetchall():
                match = RUN_SUFFIX.search(name)
                if match and not alive(int(match[1])):
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    dropped.append(name)
    finally:
        conn.close()
    return dropped


def main(argv):
    env = dict(os.environ)
    database_url = env.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    dropped = drop_databases_of_dead_runs(database_url)
    if dropped:
        print(f"Dropped {len(dropped)} database(s) left by killed test runs.", flush=True)
    env["DATABASE_URL"] = run_database_url(database_url, os.getpid())
    redis_server = None
    if env.get("CAO_TEST_REDIS_URL"):
        env["REDIS_URL"] = env["CAO_TEST_REDIS_URL"]
    else:
        redis_server = PrivateRedis().start()
        env["REDIS_URL"] = redis_server.url(0)
    print(f"Test run {os.getpid()}: database {urlsplit(env['DATABASE_URL']).path.lstrip('/')}, "
          f"Redis {env['REDIS_URL']}", flush=True)
    try:
        return subprocess.call([sys.executable, "-m", "pytest", *argv], env=env)
    finally:
        if redis_server:
            redis_server.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
