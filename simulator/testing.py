"""Helpers for tests and benchmarks: run a simulator and drive its control API.

- ``SimulatorProcess``: ``manage.py simulate_services`` in a subprocess (can be
  killed and restarted on the same port, like a real service).
- ``SimulatorThread``: the same server in a background thread of this process,
  for fast tests.

Both are context managers and share the client methods of ``SimulatorClient``::

    with SimulatorThread(fail={"summarizer_pro": "503x2"}) as sim:
        settings_env = sim.env()              # {"SUMMARIZER_PRO_URL": "http://127.0.0.1:PORT/summarizer_pro", ...}
        sim.configure(latency={"fast_chat_llm": "200ms"})
        assert sim.stats("summarizer_pro")["calls"] == 0
"""

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import requests

from scripts.polling import wait_until
from services_registry.reference import SERVICES
from simulator.errors import ControlError
from simulator.knobs import KNOBS, config_apply, parse_changes
from simulator.server import SimulatorServer, app_build, bind_socket, root_url, service_env_name

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_SERVICES = tuple(service[0] for service in SERVICES)
_LISTENING = re.compile(r"Simulator listening on (http://\S+)")


def wait_for(predicate, *, timeout=5.0, interval=0.02, message="condition"):
    """``scripts.polling.wait_until`` with the short defaults of a simulator's start."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=message)


def _check_knob_names(knobs):
    unknown = set(knobs) - set(KNOBS)
    if unknown:
        raise TypeError(f"unknown knob(s) {', '.join(sorted(unknown))}; use {', '.join(KNOBS)}")


class SimulatorClient:
    """Client of a running simulator's control API, and the URLs the gateway should use."""

    def __init__(self, url=None, *, services=REFERENCE_SERVICES, timeout=5.0):
        self.url = url
        self.services = tuple(services)
        self.timeout = timeout
        self._http = requests.Session()
        # Loopback only: never route control calls through an environment proxy.
        self._http.trust_env = False

    def base_url(self, service):
        """The gateway's base_url for ``service``, e.g. ``http://127.0.0.1:9100/fast_chat_llm``."""
        return f"{self.url}/{service}"

    def execute_url(self, service, execute_path="/v1/execute"):
        return self.base_url(service) + execute_path

    def env(self):
        """``{"<SERVICE>_URL": base_url}`` overrides pointing the gateway at this simulator."""
        return {service_env_name(service): self.base_url(service) for service in self.services}

    def _call(self, method, path, **kwargs):
        if self.url is None:
            raise ControlError("the simulator is not running")
        try:
            response = self._http.request(method, f"{self.url}/_sim{path}", timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise ControlError(f"cannot reach the simulator at {self.url}: {exc}") from None
        if response.status_code != 200:
            raise ControlError(f"{method} /_sim{path} answered {response.status_code}: {response.text[:500]}")
        return response.json()

    def healthy(self):
        try:
            return bool(self._call("GET", "/health").get("ok"))
        except ControlError:
            return False

    def configure(self, **knobs):
        """Merge knobs, e.g. ``configure(fail={"summarizer_pro": "503x2"}, latency={"*": "50ms"})``; None removes one.

        Returns the whole configuration in force.
        """
        _check_knob_names(knobs)
        return self._call("POST", "/config", json=knobs)

    def config(self):
        return self._call("GET", "/config")

    def stats(self, service=None, *, keys=True):
        """Counters of every service, or of ``service`` only."""
        params = {"keys": "1" if keys else "0"}
        if service:
            params["service"] = service
        stats = self._call("GET", "/stats", params=params)
        return stats[service] if service else stats

    def reset(self, *, config=False):
        """Clear counters, per-key knob counts and the request log; with ``config``, restore the startup knobs."""
        self._call("POST", "/reset", json={"config": config})

    def requests(self, service=None, *, kind=None, limit=None):
        """The latest received requests (oldest first): method, path, headers, json, status, ..."""
        params = {name: value for name, value in (("service", service), ("kind", kind), ("limit", limit)) if value}
        return self._call("GET", "/requests", params=params)

    def wait_ready(self, timeout=10.0):
        wait_for(self.healthy, timeout=timeout, message=f"simulator at {self.url} healthy")
        return self

    def close(self):
        self._http.close()


class _Runner(SimulatorClient):
    """A simulator this helper starts and stops; a context manager."""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info):
        self.stop()
        self.close()


class SimulatorProcess(_Runner):
    """``manage.py simulate_services`` in a subprocess, on a free port (kept across restarts).

    Knobs are keyword arguments shaped like ``configure``'s, e.g.
    ``SimulatorProcess(fail={"summarizer_pro": "503x2"}, hang={"video_gen_v2": True})``
    (True = the knob with its default value). The current environment is passed
    through (SECRET_KEY included), updated by ``env_overrides``.
    """

    def __init__(
        self,
        *,
        host="127.0.0.1",
        port=0,
        api_key=None,
        api_key_header=None,
        extra_services=(),
        extra_args=(),
        env_overrides=None,
        python=None,
        startup_timeout=20.0,
        **knobs,
    ):
        _check_knob_names(knobs)
        super().__init__(services=REFERENCE_SERVICES + tuple(extra_services))
        self.host = host
        self.port = port
        self.api_key = api_key
        self.api_key_header = api_key_header
        self.extra_services = tuple(extra_services)
        self.extra_args = tuple(extra_args)
        self.env_overrides = dict(env_overrides or {})
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.knobs = knobs
        self.process = None
        self.log_path = None

    def command(self):
        """The argv that starts the simulator."""
        argv = [self.python, str(ROOT / "manage.py"), "simulate_services"]
        argv += ["--host", self.host, "--port", str(self.port)]
        for kind, per_service in self.knobs.items():
            for service, value in (per_service or {}).items():
                if value is None or value is False:
                    continue
                argv += [f"--{kind.replace('_', '-')}", service if value is True else f"{service}={value}"]
        if self.api_key:
            argv += ["--api-key", self.api_key]
        if self.api_key_header:
            argv += ["--api-key-header", self.api_key_header]
        for name in self.extra_services:
            argv += ["--extra-service", name]
        return argv + list(self.extra_args)

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def output(self):
        """Everything the process printed so far (stdout and stderr, across restarts)."""
        return Path(self.log_path).read_text(errors="replace") if self.log_path else ""

    def start(self):
        if self.running:
            return self
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="simulator-", suffix=".log")
            os.close(fd)
        offset = Path(self.log_path).stat().st_size
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env_overrides},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.url = wait_for(
                lambda: self._announced_url(offset), timeout=self.startup_timeout, message="simulator started"
            )
            self.port = int(self.url.rsplit(":", 1)[1])
            self.wait_ready(timeout=self.startup_timeout)
        except (TimeoutError, ControlError) as exc:
            self.kill()
            raise ControlError(f"the simulator did not start ({exc}); output:\n{self.output()[-3000:]}") from None
        return self

    def _announced_url(self, offset):
        with open(self.log_path, "rb") as log:
            log.seek(offset)
            match = _LISTENING.search(log.read().decode(errors="replace"))
        if match:
            return match[1]
        if self.process.poll() is not None:
            raise ControlError(f"exited with status {self.process.returncode}")
        return None

    def stop(self, timeout=10.0):
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status (None if never started)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self):
        """SIGKILL: open connections drop, nothing is answered; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def restart(self, *, kill=False):
        """Stop (or kill) and start again on the same port, with the startup knobs and fresh counters."""
        self.kill() if kill else self.stop()
        return self.start()

    def close(self):
        """Release the HTTP session and delete the output file (stop first)."""
        super().close()
        if self.log_path:
            Path(self.log_path).unlink(missing_ok=True)
            self.log_path = None


class SimulatorThread(_Runner):
    """The simulator served from a background thread of this process (same knobs as SimulatorProcess)."""

    def __init__(
        self,
        *,
        host="127.0.0.1",
        port=0,
        api_key=None,
        api_key_header="X-API-Key",
        extra_services=(),
        seed=None,
        graceful_timeout_s=2.0,
        **knobs,
    ):
        _check_knob_names(knobs)
        services = REFERENCE_SERVICES + tuple(extra_services)
        super().__init__(services=services)
        self.host = host
        self.port = port
        self.api_key = api_key
        self.api_key_header = api_key_header
        self.seed = seed
        self.graceful_timeout_s = graceful_timeout_s
        # Parsed now so a bad knob fails in the caller, not in the thread.
        self.startup_config = config_apply({}, parse_changes(knobs, services))
        self.server = None
        self._thread = None
        self._loop = None

    @property
    def running(self):
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout=10.0):
        if self.running:
            return self
        app = app_build(
            self.services,
            config=self.startup_config,
            api_key=self.api_key,
            api_key_header=self.api_key_header,
            rng=random.Random(self.seed),
        )
        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.url = root_url(sock)
        self.server = SimulatorServer(app, graceful_timeout_s=self.graceful_timeout_s, loop="asyncio")
        self._thread = threading.Thread(target=self._serve, args=(self.server, sock), name="simulator", daemon=True)
        self._thread.start()
        wait_for(lambda: self.server.started or not self._thread.is_alive(), timeout=timeout, message="server started")
        if not self.server.started:
            raise ControlError("the simulator thread stopped during startup")
        return self.wait_ready(timeout)

    def _serve(self, server, sock):
        async def serve():
            self._loop = asyncio.get_running_loop()
            await server.serve(sockets=[sock])

        asyncio.run(serve())

    def stop(self, timeout=10.0):
        """Graceful stop: sleeping calls are answered 503 SHUTTING_DOWN, idle connections close."""
        if not self.running:
            return
        self.server.should_exit = True
        self._thread.join(timeout)

    def kill(self, timeout=10.0):
        """Abrupt stop, like SIGKILL: open connections are dropped without an answer."""
        if not self.running:
            return
        server = self.server

        def abort():
            server.force_exit = True
            server.should_exit = True
            server.abort_connections()

        self._loop.call_soon_threadsafe(abort)
        self._thread.join(timeout)

    def restart(self, *, kill=False):
        """Stop (or kill) and start again on the same port, with the startup knobs and fresh counters."""
        self.kill() if kill else self.stop()
        return self.start()
