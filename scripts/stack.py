"""Run the whole gateway locally: `python -m scripts.stack [--demo]`.

Migrates, creates a local admin, then starts every process of the stack
(API server, one worker per queue, the scheduler and the service simulator),
each logging to its own file under ``.run/logs/<timestamp>/`` (also reachable
as ``.run/logs/latest``). The environment given to this command reaches every
process. Ctrl-C stops everything it started.
"""

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from services_registry import reference

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"


@dataclass
class ProcessSpec:
    """One process of the stack: a name and the command that starts it."""

    name: str
    command: list
    env: dict = field(default_factory=dict)
    nice: int = 0  # added to the process's niceness: how readily it yields the CPU to the others


def local_secret(name, generate):
    """A value kept in .run/ across runs, generated once."""
    path = RUN_DIR / name
    if not path.exists():
        RUN_DIR.mkdir(exist_ok=True)
        path.write_text(generate())
        path.chmod(0o600)
    return path.read_text().strip()


def ensure_dotenv():
    """Give this checkout a SECRET_KEY in .env (settings load it), so every
    `manage.py` command works here too, not only the processes started by this script."""
    path = ROOT / ".env"
    lines = path.read_text().splitlines() if path.exists() else []
    if not any(line.startswith("SECRET_KEY=") for line in lines):
        lines.append(f"SECRET_KEY={secrets.token_urlsafe(50)}")
        path.write_text("\n".join(lines) + "\n")
        path.chmod(0o600)


def base_environment():
    ensure_dotenv()
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# Worker pools per queue: (processes, threads). Parked steps hold no thread.
# Green workers (common/green.py) run greenlets: a call in flight costs a
# few kB, so the services' limits, not these counts, bound the calls in
# flight. Thread workers (CAO_WORKER_MODE=threads, and the RabbitMQ broker,
# whose client keeps a connection per thread) are bounded by their threads.
WORKER_POOLS = {
    "green": {"heavy": (1, 100), "medium": (1, 400), "default": (1, 400), "webhooks": (1, 100)},
    "threads": {"heavy": (1, 4), "medium": (1, 16), "default": (1, 16), "webhooks": (1, 8)},
}
# The webhook delivery queue's pool (CAO_WEBHOOK_QUEUE): receivers, however
# slow, never hold a step worker.
WEBHOOK_QUEUE = "webhooks"


def worker_mode(env, root=None):
    """"green" or "threads": CAO_WORKER_MODE, else green unless the broker is RabbitMQ.

    A ``root`` checkout older than green workers (a benchmark's "before") runs threads.
    """
    if root is not None and not (Path(root) / "common" / "green.py").exists():
        return "threads"
    mode = env.get("CAO_WORKER_MODE") or ("threads" if env.get("BROKER_URL", "").startswith("amqp") else "green")
    if mode not in WORKER_POOLS:
        raise ValueError(f"CAO_WORKER_MODE must be one of {', '.join(WORKER_POOLS)}, not {mode!r}")
    return mode


# Workers run this much nicer than the API processes (CAO_WORKER_NICE), so
# that on a host they share, the API answers and pushes events sooner
# while the workers take the rest of the CPU. Measured on two cores
# (docs/PERFORMANCE.md, item 16): at +10 the terminal event of the 200-job
# burst reached its socket p95 849 -> 38 ms after its commit, but the burst
# ran 104 against 135 steps/s at +0 (two alternated pairs: the API's intake
# took the CPU); at +5, 142 and 155 against 113 and 159 steps/s.
DEFAULT_WORKER_NICE = 5


def worker_nice(env):
    """How much nicer than the API the workers run: CAO_WORKER_NICE (0 to 19), else DEFAULT_WORKER_NICE."""
    raw = env.get("CAO_WORKER_NICE", "").strip()
    if not raw:
        return DEFAULT_WORKER_NICE
    try:
        nice = int(raw)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ValueError(f"CAO_WORKER_NICE must be a whole number from 0 to 19, not {raw!r}")
    return nice


def worker_command(python, manage_py, queue, *, mode):
    processes, threads = WORKER_POOLS[mode].get(queue, (1, 8))
    return [
        python, manage_py, "rundramatiq", "--queues", queue, "--processes", str(processes), "--threads", str(threads),
        *(["--use-gevent"] if mode == "green" else []),
    ]
# The seeded services, each pointed at the bundled simulator.
SERVICES = [service[0] for service in reference.SERVICES]


# uvicorn's h11 protocol, with a limit on request heads (431 beyond
# CAO_MAX_HEADER_BYTES): httptools, its default, reads a header of any size.
# docker-entrypoint.sh passes the same options.
API_SERVER_OPTIONS = ("--http", "common.http_protocol:H11Protocol")


# Seconds a stopping API process lets open requests and streams finish.
# docker-entrypoint.sh uses the same figure.
API_GRACEFUL_SHUTDOWN_S = 5


def api_server_options(root):
    """API_SERVER_OPTIONS, unless ``root`` is an older checkout without that protocol (a benchmark's "before")."""
    return API_SERVER_OPTIONS if (Path(root) / "common" / "http_protocol.py").exists() else ()


def simulator_env(env, simulator_port):
    """Point every service whose URL the caller did not set at the bundled simulator."""
    return {
        f"{name.upper()}_URL": f"http://127.0.0.1:{simulator_port}/{name}"
        for name in SERVICES
        if not env.get(f"{name.upper()}_URL")
    }


def api_command(python, root, host, port):
    return [
        python, "-m", "uvicorn", "cao_project.asgi:application", "--app-dir", str(root),
        "--host", host, "--port", str(port), "--lifespan", "off", "--no-access-log",
        # Open event streams would hold a stop off forever: cut them
        # after this (their clients reconnect with Last-Event-ID).
        "--timeout-graceful-shutdown", str(API_GRACEFUL_SHUTDOWN_S),
        *api_server_options(root),
    ]


def stack_processes(
    *,
    python,
    host,
    port,
    simulator_port,
    simulator_args=(),
    queues=reference.QUEUES,
    root=ROOT,
    worker_hosts=1,
    mode="green",
    more_api_ports=(),
    worker_nice=DEFAULT_WORKER_NICE,
):
    """The processes of a local stack, in start order; ``mode`` is the workers' (worker_mode()).

    ``root`` is the checkout whose code they run (default: this one), so a
    benchmark can start the stack of another checkout, e.g. a git worktree
    of an older commit. Workers run ``worker_nice`` nicer than the rest.
    """
    manage_py = str(Path(root) / "manage.py")
    specs = [
        ProcessSpec(
            "simulator",
            [
                python, manage_py, "simulate_services", "--host", "127.0.0.1", "--port", str(simulator_port),
                *simulator_args,
            ],
        ),
        ProcessSpec("api", api_command(python, root, host, port)),
    ]
    # More API processes, each on its port of ``more_api_ports``: any of them
    # serves any job's WebSocket or stream (the pushes go through Redis).
    for number, more_port in enumerate(more_api_ports, start=2):
        specs.append(ProcessSpec(f"api_{number}", api_command(python, root, host, more_port)))
    # worker_hosts > 1 simulates more worker hosts on this machine: each
    # extra set of workers is its own process group, like another host's.
    for host_number in range(1, worker_hosts + 1):
        prefix = "" if host_number == 1 else f"host{host_number}_"
        for queue in queues:
            specs.append(
                ProcessSpec(
                    f"{prefix}worker_{queue}", worker_command(python, manage_py, queue, mode=mode), nice=worker_nice
                )
            )
        # An older checkout (a benchmark's "before") has no webhooks app.
        if (Path(root) / "webhooks").is_dir():
            specs.append(
                ProcessSpec(
                    f"{prefix}worker_{WEBHOOK_QUEUE}",
                    worker_command(python, manage_py, WEBHOOK_QUEUE, mode=mode),
                    nice=worker_nice,
                )
            )
    specs.append(ProcessSpec("scheduler", [python, manage_py, "run_scheduler"]))
    return specs


def _niced(increment):
    def lower_priority():
        os.nice(increment)

    return lower_priority


class Stack:
    """Starts, watches and stops a set of processes, each with its own log file.

    Processes run in ``root`` (default: this checkout), the checkout whose
    code ``stack_processes(root=...)`` points them at.
    """

    def __init__(self, specs, *, env, log_dir, root=ROOT):
        self.specs = {spec.name: spec for spec in specs}
        self.root = Path(root)
        self.env = env
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes = {}

    def start(self, name):
        spec = self.specs[name]
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            spec.command,
            cwd=self.root,
            env={**self.env, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches this supervisor only, which then
            # stops each child (and its children) in order.
            start_new_session=True,
            preexec_fn=_niced(spec.nice) if spec.nice else None,
        )
        log.close()
        return self.processes[name]

    def start_all(self):
        for name in self.specs:
            self.start(name)

    def signal(self, name, signum, *, group=False):
        """Signal a process; with ``group``, its children too (they share its process group)."""
        process = self.processes.get(name)
        if process and process.poll() is None:
            if group:
                os.killpg(process.pid, signum)
            else:
                # Only the leader: a Dramatiq master forwards SIGTERM to its
                # worker processes itself, and a second one would make them
                # exit without finishing their current messages.
                os.kill(process.pid, signum)

    def kill(self, name):
        """SIGKILL a process and everything it started."""
        process = self.processes.get(name)
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()

    def stop(self, name, timeout=15):
        self.stop_all([name], timeout=timeout)

    def stop_all(self, names=None, timeout=15):
        """SIGTERM once (a second one makes Dramatiq abandon its messages), wait, then SIGKILL."""
        names = list(reversed(list(self.processes))) if names is None else names
        for name in names:
            self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name in names:
            process = self.processes.get(name)
            if process is None:
                continue
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill(name)

    def exited(self):
        """Names and exit codes of processes that stopped."""
        return {
            name: process.returncode
            for name, process in self.processes.items()
            if process.poll() is not None
        }


def manage(python, env, *args, check=True):
    return subprocess.run([python, "manage.py", *args], cwd=ROOT, env=env, check=check)


def http_json(url, *, method="GET", body=None, api_key=None, timeout=5):
    """(status, parsed JSON body) of one request; (None, None) when nothing answers."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["X-API-Key"] = api_key
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")
    except OSError:
        return None, None


def wait_http(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, body = http_json(url, timeout=2)
        if status == 200:
            return body
        time.sleep(0.2)
    return None


def new_log_dir():
    logs = RUN_DIR / "logs"
    log_dir = logs / datetime.now().strftime("%Y%m%d-%H%M%S")
    log_dir.mkdir(parents=True, exist_ok=True)
    latest = logs / "latest"
    if latest.is_symlink() or latest.exists():
        latest.unlink()
    latest.symlink_to(log_dir.name)
    return log_dir


def ensure_local_admin(python, env):
    password = local_secret("admin_password", lambda: secrets.token_urlsafe(12))
    result = subprocess.run(
        [python, "manage.py", "createsuperuser", "--noinput", "--username", "admin", "--email", "admin@localhost"],
        cwd=ROOT,
        env={**env, "DJANGO_SUPERUSER_PASSWORD": password},
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 and "already taken" not in result.stderr:
        print(result.stderr, file=sys.stderr)
    return "admin", password


def ensure_local_api_key(python, env, base_url):
    """A staff API key for local use, kept in .run/api_key and recreated when the database lost it."""
    path = RUN_DIR / "api_key"
    if path.exists():
        status, _ = http_json(f"{base_url}/api/v1/jobs?limit=1", api_key=path.read_text().strip())
        if status == 200:
            return path.read_text().strip()
    result = subprocess.run(
        [python, "manage.py", "create_api_key", "local-dev", "--staff"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    path.write_text(result.stdout.strip().splitlines()[-1])
    path.chmod(0o600)
    return path.read_text().strip()


def run_demo(base_url, api_key, *, timeout=120):
    """Submit a business_plan job and print its steps live, over its WebSocket."""
    import asyncio

    from scripts.watch_job import watch

    status, body = http_json(
        f"{base_url}/api/v1/jobs",
        method="POST",
        body={"feature_name": "business_plan", "input_data": {"business_name": "Acme Labs", "idea": "AI tea"}},
        api_key=api_key,
    )
    if status != 201:
        print(f"error: the demo job was refused ({status}): {body}", file=sys.stderr)
        return False
    print(f"Demo job {body['job_id']} (business_plan), watched over {body['monitor_url'].split('?')[0]}", flush=True)
    started = time.monotonic()
    outcome = asyncio.run(watch(body["monitor_url"], out=lambda line: print("  " + line, flush=True), timeout=timeout))
    print(f"  ({time.monotonic() - started:.1f} s)\n", flush=True)
    return outcome == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="submit a demo job and show its progress")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    parser.add_argument(
        "--simulator-port", type=int, default=int(os.environ.get("CAO_SIMULATOR_PORT", "9100"))
    )
    args = parser.parse_args(argv)

    python = sys.executable
    env = base_environment()
    env.update(simulator_env(env, args.simulator_port))
    manage(python, env, "migrate", "--noinput", "-v", "0")
    manage(python, env, "collectstatic", "--noinput", "-v", "0")
    username, password = ensure_local_admin(python, env)

    log_dir = new_log_dir()
    # One metrics directory per run, shared by every process: /metrics adds them up.
    if not env.get("PROMETHEUS_MULTIPROC_DIR"):
        env["PROMETHEUS_MULTIPROC_DIR"] = str(log_dir / "metrics")
        (log_dir / "metrics").mkdir()
    specs = stack_processes(
        python=python,
        host=args.host,
        port=args.port,
        simulator_port=args.simulator_port,
        # The demo's services take a moment, like real ones, so progress is visible.
        simulator_args=["--latency", "*=400ms~150ms"] if args.demo else [],
        mode=worker_mode(env),
        worker_nice=worker_nice(env),
    )
    stack = Stack(specs, env=env, log_dir=log_dir)
    base = f"http://{args.host}:{args.port}"
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start_all()
        if wait_http(f"{base}/api/v1/health", 30) is None:
            print(f"error: the API did not come up; see {log_dir / 'api.log'}", file=sys.stderr)
            return 1
        api_key = ensure_local_api_key(python, env, base)
        print(
            f"\nCAO Gateway is running ({', '.join(spec.name for spec in specs)}).\n"
            f"  API       {base}/api/v1/\n"
            f"  API docs  {base}/api/v1/docs\n"
            f"  Admin     {base}/admin/  (user {username}, password {password})\n"
            f"  API key   {api_key}  (staff; also in .run/api_key)\n"
            f"  Logs      {log_dir} (also .run/logs/latest)\n",
            flush=True,
        )
        if args.demo:
            run_demo(base, api_key)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            exited = stack.exited()
            if exited:
                for name, code in exited.items():
                    print(f"error: {name} exited with code {code}; see {log_dir / (name + '.log')}", file=sys.stderr)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    finally:
        # A second Ctrl-C (or the SIGTERM that make and timeout pass on) must
        # not cut the stop short and leave processes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stack.stop_all()


if __name__ == "__main__":
    sys.exit(main())
