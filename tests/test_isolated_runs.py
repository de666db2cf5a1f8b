"""Two test runs on one machine never share a database or a Redis (scripts/isolated_pytest.py)."""

import psycopg2
import pytest
import redis

from scripts.isolated_pytest import drop_databases_of_dead_runs, run_database_url
from scripts.private_servers import PrivateRedis


def test_each_run_gets_database_names_of_its_own():
    assert run_database_url("postgresql://u:p@db:5433/cao", 4242) == "postgresql://u:p@db:5433/cao_r4242"
    assert run_database_url("postgresql://postgres@127.0.0.1:5432/", 7) == "postgresql://postgres@127.0.0.1:5432/cao_r7"


@pytest.fixture
def server_url(settings):
    return settings.DATABASE_URL


def _create(server_url, name):
    conn = psycopg2.connect(server_url.rsplit("/", 1)[0] + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
        cursor.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def _exists(server_url, name):
    conn = psycopg2.connect(server_url.rsplit("/", 1)[0] + "/postgres")
    with conn.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        found = cursor.fetchone() is not None
    conn.close()
    return found


def test_databases_of_killed_runs_are_dropped_and_live_runs_kept(server_url):
    base = server_url.rsplit("/", 1)[0] + "/isolationcheck"
    dead, live = "test_isolationcheck_r111111", "isolationcheck_r222222_e2e"
    _create(server_url, dead)
    _create(server_url, live)
    try:
        dropped = drop_databases_of_dead_runs(base, alive=lambda pid: pid == 222222)

        assert dropped == [dead]
        assert not _exists(server_url, dead) and _exists(server_url, live)
    finally:
        drop_databases_of_dead_runs(base, alive=lambda pid: False)


def test_a_private_redis_whose_port_was_taken_moves_to_another():
    # Given a port already served by another redis-server
    squatter = PrivateRedis().start()
    ours = PrivateRedis()
    ours.port = squatter.port
    try:
        # When ours starts on it, it is not fooled by the other's answers
        ours.start()

        assert ours.port != squatter.port
        pid = int(redis.Redis(port=ours.port, decode_responses=True).info("server")["process_id"])
        assert pid == ours.process.pid
    finally:
        ours.close()
        squatter.close()


@pytest.mark.django_db(transaction=True)
def test_a_stack_that_never_becomes_ready_is_stopped_not_left_running(testbed, monkeypatch):
    # Given a stack whose readiness check gives up (as when a worker cannot import its code)
    from scripts.testbed import Testbed

    started = {}

    def gives_up(self, timeout=60):
        started.update(self.stack.processes)
        raise TimeoutError("timed out waiting for 3 workers to consume")

    monkeypatch.setattr(Testbed, "wait_ready", gives_up)

    # When it is entered, Then the error comes through and no process it started is left running
    with pytest.raises(TimeoutError):
        with testbed():
            pass
    assert started and all(process.poll() is not None for process in started.values())
