"""Servers of a test's (or a run's) own: restart them without touching anything else.

- ``PrivateRedis``: a redis-server on a free port, no persistence (unless a
  test saves a snapshot itself); ``restart`` crashes it and starts it again
  on the same port, from whatever it saved.
- ``PrivatePostgres``: a PostgreSQL cluster in a temporary folder, on a free port.

Standard library, redis and psycopg2 only: no Django, so a test runner can
start them before the settings are read.
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg2
import redis

POSTGRES_BIN = Path(os.environ.get("CAO_POSTGRES_BIN", "/usr/lib/postgresql/15/bin"))
# A free port is found by binding port 0 and releasing it; another process
# may take it before the server binds it, so a start is tried this often.
START_ATTEMPTS = 5


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A redis-server owned by the test: start, stop, restart (empty, like a crash)."""

    def __init__(self, directory=None):
        self.port = free_port()
        self.directory = directory or tempfile.mkdtemp(prefix="cao-redis-")
        self.process = None

    def url(self, db=0):
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self):
        """Start the server; a first start moves to another port if its port was taken meanwhile."""
        for _ in range(START_ATTEMPTS):
            self.process = subprocess.Popen(
                [
                    shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", self.directory, "--daemonize", "no",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if self._answers_as_ours():
                self._started = True
                return self
            if getattr(self, "_started", False):
                raise RuntimeError(f"redis-server could not restart on port {self.port} (taken?)")
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start after {START_ATTEMPTS} ports")

    def _answers_as_ours(self, timeout=10):
        # Another process's server on the same port would answer PING too:
        # only our own process id counts.
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5, decode_responses=True)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    return False  # it exited: its port was taken
                try:
                    if int(client.info("server")["process_id"]) == self.process.pid:
                        return True
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise TimeoutError(f"timed out after {timeout} s waiting for the private redis-server")

    def stop(self, *, kill=False):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            self.process.wait(10)

    def restart(self, *, down_for=0.0):
        """Crash and come back empty (no persistence), on the same port."""
        self.stop(kill=True)
        time.sleep(down_for)
        return self.start()

    def close(self):
        self.stop(kill=True)
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster owned by the test, in a temporary folder, on a free port."""

    def __init__(self):
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="cao-pg-")
        self.data = os.path.join(self.directory, "data")
        # PostgreSQL refuses to run as root: use the postgres account then.
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.directory, "postgres")

    @staticmethod
    def available():
        return (POSTGRES_BIN / "initdb").exists() and (os.geteuid() != 0 or shutil.which("runuser"))

    def url(self, database="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command, check=True):
        return subprocess.run([*self.run_as, *command], check=check, capture_output=True, text=True)

    def init(self):
        self._run(str(POSTGRES_BIN / "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self):
        self._run(
            str(POSTGRES_BIN / "pg_ctl"), "-D", self.data, "-w", "-t", "30", "-l", os.path.join(self.directory, "log"),
            "-o", f"-p {self.port} -h 127.0.0.1 -k {self.directory} -c fsync=off -c max_connections=200",
            "start",
        )
        return self

    def stop(self, *, mode="immediate"):
        self._run(str(POSTGRES_BIN / "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop", check=False)

    def accepts_connections(self):
        try:
            psycopg2.connect(self.url(), connect_timeout=2).close()
        except psycopg2.OperationalError:
            return False
        return True

    def restart(self, *, down_for=0.0):
        """Stop at once (like a crash: no clean shutdown) and start again."""
        self.stop(mode="immediate")
        time.sleep(down_for)
        return self.start()

    def close(self):
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


