"""A real gateway stack in separate processes, for end-to-end tests and benchmarks.

- ``PrivateRedis`` / ``PrivatePostgres`` (scripts/private_servers.py): a
  redis-server or a PostgreSQL cluster of its own, so restarting it touches
  nothing else on the machine.
- ``Testbed``: the processes of ``make serve`` (simulator, API, one worker per
  queue, scheduler) against a given database and Redis, with helpers to kill,
  restart and inspect each process, submit jobs and read the simulator's
  counters. ``root`` runs the code of another checkout (default: this one).
"""

import os
import secrets
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psycopg2
import redis
import requests

from scripts.local_backends import ensure_database
from scripts.polling import wait_until
from scripts.private_servers import POSTGRES_BIN, PrivatePostgres, PrivateRedis, free_port  # noqa: F401
from scripts.stack import ROOT, Stack, simulator_env, stack_processes, worker_mode, worker_nice
from simulator.testing import SimulatorClient



def with_database(url, name):
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class Testbed:
    """The gateway's processes against one database and one Redis; a context manager."""

    __test__ = False  # not a test class, despite its name

    def __init__(
        self,
        *,
        database_url,
        redis_url,
        log_dir,
        env=None,
        simulator_args=(),
        scheduler=True,
        worker_hosts=1,
        port=None,
        simulator_port=None,
        root=ROOT,
        api_processes=1,
    ):
        self.root = Path(root)
        self.worker_hosts = worker_hosts
        self.database_url = database_url
        self.redis_url = redis_url
        self.port = port or free_port()
        self.simulator_port = simulator_port or free_port()
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "BROKER_URL": redis_url,
            "SECRET_KEY": os.environ.get("SECRET_KEY") or secrets.token_urlsafe(40),
            "CAO_ENV_FILE": "",
            "PYTHONUNBUFFERED": "1",
            **simulator_env({}, self.simulator_port),
            **(env or {}),
        }
        self.simulator_args = list(simulator_args)
        self.worker_mode = worker_mode(self.env, self.root)
        self.scheduler = scheduler
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        # The other API processes (api_2, ...): their base URLs, in order.
        self.more_api_ports = [free_port() for _ in range(api_processes - 1)]
        self.more_api_urls = [f"http://127.0.0.1:{port}" for port in self.more_api_ports]
        self.simulator = SimulatorClient(f"http://127.0.0.1:{self.simulator_port}")
        self.log_dir = Path(log_dir)
        self.stack = None
        self.api_key = None
        self.session = requests.Session()
        # Every process reads service rows through a cache (CAO_REGISTRY_CACHE_S):
        # a change made here applies everywhere once the oldest copy expired.
        self.registry_cache_s = float(self.env.get("CAO_REGISTRY_CACHE_S") or 1.0)
        self._registry_applies_at = 0.0

    # --- set-up ---------------------------------------------------------------

    def manage(self, *args):
        return subprocess.run(
            [sys.executable, "manage.py", *args], cwd=self.root, env=self.env, check=True, capture_output=True, text=True
        )

    def prepare(self):
        """Create and migrate the database, empty Redis, make an API key."""
        ensure_database(self.database_url)
        redis.Redis.from_url(self.redis_url).flushdb()
        self.manage("migrate", "--noinput", "-v", "0")
        # CASCADE: the tables that refer to jobs (the webhook outbox) are emptied too.
        self.sql("TRUNCATE jobs_job, jobs_stepattempt, jobs_jobevent CASCADE")
        self.api_key = self.new_api_key("testbed", staff=True)
        return self

    def __enter__(self):
        self.prepare()
        specs = stack_processes(
            python=sys.executable,
            host="127.0.0.1",
            port=self.port,
            simulator_port=self.simulator_port,
            simulator_args=self.simulator_args,
            root=self.root,
            worker_hosts=self.worker_hosts,
            mode=self.worker_mode,
            more_api_ports=self.more_api_ports,
            worker_nice=worker_nice(self.env),
        )
        if not self.scheduler:
            specs = [spec for spec in specs if spec.name != "scheduler"]
        self.stack = Stack(specs, env=self.env, log_dir=self.log_dir, root=self.root)
        try:
            self.stack.start_all()
            self.wait_ready()
        except BaseException:
            # A stack that never became ready is stopped too: its processes
            # would otherwise outlive the run and consume its queues.
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info):
        if self.stack:
            self.stack.stop_all(timeout=20)
        self.session.close()

    def wait_ready(self, timeout=60):
        def ready():
            try:
                apis = [self.base_url, *self.more_api_urls]
                return all(self.session.get(f"{url}/api/v1/health", timeout=1).ok for url in apis) and self.simulator.healthy()
            except requests.RequestException:
                return False

        wait_until(ready, timeout=timeout, message=f"the stack to start (logs in {self.log_dir})")
        self.wait_workers_consuming(timeout=timeout)

    def wait_workers_consuming(self, timeout=60):
        """Wait until every worker process consumes its queue: each has fetched once (its broker heartbeat)."""
        workers = [name for name in self.stack.specs if "worker_" in name and name in self.stack.processes]
        client = redis.Redis.from_url(self.redis_url)

        def consuming():
            try:
                return client.zcard("dramatiq:__heartbeats__") >= len(workers)
            except redis.RedisError:
                return False

        try:
            wait_until(consuming, timeout=timeout, message=f"{len(workers)} workers to consume (logs in {self.log_dir})")
        finally:
            client.close()

    # --- processes ---------------------------------------------------------------

    @property
    def process_names(self):
        return list(self.stack.specs)

    def kill(self, name):
        """SIGKILL a process and its children, as a crash would."""
        self.stack.kill(name)

    def start(self, name):
        self.stack.start(name)

    def restart(self, name):
        self.stack.stop(name)
        self.stack.start(name)

    def alive(self, name):
        process = self.stack.processes.get(name)
        return process is not None and process.poll() is None

    def log(self, name):
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- data ------------------------------------------------------------------------

    @contextmanager
    def cursor(self):
        conn = psycopg2.connect(self.database_url, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                yield cursor
        finally:
            conn.close()

    def sql(self, statement, params=None):
        with self.cursor() as cursor:
            cursor.execute(statement, params)
            return cursor.fetchall() if cursor.description else None

    def database_connections(self):
        """PostgreSQL backends connected to the stack's database (this query's own excluded)."""
        return self.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )[0][0]

    def set_service(self, name, **fields):
        """Change a service's row; the next submission waits until every process applies it.

        Lowering a limit is otherwise not a limit for up to CAO_REGISTRY_CACHE_S:
        a process that cached the row just before would grant by the old one.
        """
        assignments = ", ".join(f"{field} = %s" for field in fields)
        self.sql(f"UPDATE services_registry_service SET {assignments} WHERE name = %s", [*fields.values(), name])
        # 50 ms for the clocks of the processes: they cache by time.monotonic().
        self._registry_applies_at = time.monotonic() + self.registry_cache_s + 0.05

    def wait_registry_applied(self):
        """Wait out the registry cache after set_service: a known bound, not a guess."""
        remaining = self._registry_applies_at - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)

    def new_api_key(self, name, *, staff=False):
        """A new API key of the stack (a tenant of its own); the raw key."""
        return self.manage("create_api_key", name, *(["--staff"] if staff else [])).stdout.strip().splitlines()[-1]

    def submit(self, feature="business_plan", input_data=None, session=None, api_key=None):
        self.wait_registry_applied()
        response = (session or self.session).post(
            f"{self.base_url}/api/v1/jobs",
            json={"feature_name": feature, "input_data": input_data if input_data is not None else {"n": 1}},
            headers={"X-API-Key": api_key or self.api_key},
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["job_id"]

    def submit_many(self, count, feature="business_plan", threads=8, latencies=None, api_key=None):
        """Create ``count`` jobs from ``threads`` clients; each POST's seconds go to ``latencies`` if given."""
        self.wait_registry_applied()
        sessions = [requests.Session() for _ in range(threads)]

        def submit(i):
            started = time.perf_counter()
            job_id = self.submit(feature, {"n": i}, session=sessions[i % threads], api_key=api_key)
            if latencies is not None:
                latencies.append(time.perf_counter() - started)
            return job_id

        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(submit, range(count)))

    def statuses(self, job_ids):
        rows = self.sql("SELECT status, count(*) FROM jobs_job WHERE id = ANY(%s::uuid[]) GROUP BY status", [list(job_ids)])
        return dict(rows)

    def wait_finished(self, job_ids, *, timeout=120, statuses=("COMPLETED",)):
        """Wait until every job is in one of ``statuses``; returns the seconds it took."""
        ids, started = list(job_ids), time.monotonic()

        def done():
            counts = self.statuses(ids)
            return sum(counts.get(status, 0) for status in statuses) == len(ids)

        try:
            wait_until(done, timeout=timeout, interval=0.2, message=f"{len(ids)} jobs to reach {statuses}")
        except TimeoutError as error:
            raise TimeoutError(f"{error}; now {self.statuses(ids)}; logs in {self.log_dir}") from None
        return time.monotonic() - started
