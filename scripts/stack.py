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
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"


@dataclass
class ProcessSpec:
    """One process of the stack: a name and the command that starts it."""

    name: str
    command: list
    env: dict = field(default_factory=dict)


def local_secret(name, generate):
    """A value kept in .run/ across runs, generated once."""
    path = RUN_DIR / name
    if not path.exists():
        RUN_DIR.mkdir(exist_ok=True)
        path.write_text(generate())
        path.chmod(0o600)
    return path.read_text().strip()


def base_environment():
    env = dict(os.environ)
    env.setdefault("SECRET_KEY", local_secret("secret_key", lambda: secrets.token_urlsafe(50)))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stack_processes(*, python, host, port):
    """The processes of a local stack, in start order."""
    return [
        ProcessSpec(
            "api",
            [
                python, "-m", "uvicorn", "cao_project.asgi:application",
                "--host", host, "--port", str(port), "--lifespan", "off", "--no-access-log",
            ],
        ),
    ]


class Stack:
    """Starts, watches and stops a set of processes, each with its own log file."""

    def __init__(self, specs, *, env, log_dir):
        self.specs = {spec.name: spec for spec in specs}
        self.env = env
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.processes = {}

    def start(self, name):
        spec = self.specs[name]
        log = open(self.log_dir / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            spec.command,
            cwd=ROOT,
            env={**self.env, **spec.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: Ctrl-C reaches this supervisor only, which then
            # stops each child (and its children) in order.
            start_new_session=True,
        )
        log.close()
        return self.processes[name]

    def start_all(self):
        for name in self.specs:
            self.start(name)

    def signal(self, name, signum):
        process = self.processes.get(name)
        if process and process.poll() is None:
            os.killpg(process.pid, signum)

    def stop(self, name, timeout=10):
        process = self.processes.get(name)
        if process is None or process.poll() is not None:
            return
        self.signal(name, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(name, signal.SIGKILL)
            process.wait()

    def stop_all(self):
        for name in reversed(list(self.processes)):
            self.signal(name, signal.SIGTERM)
        for name in reversed(list(self.processes)):
            self.stop(name)

    def exited(self):
        """Names and exit codes of processes that stopped."""
        return {
            name: process.returncode
            for name, process in self.processes.items()
            if process.poll() is not None
        }


def manage(python, env, *args, check=True):
    return subprocess.run([python, "manage.py", *args], cwd=ROOT, env=env, check=check)


def wait_http(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return json.load(response)
        except OSError:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="submit a demo job and show its progress")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    args = parser.parse_args(argv)

    python = sys.executable
    env = base_environment()
    manage(python, env, "migrate", "--noinput", "-v", "0")
    username, password = ensure_local_admin(python, env)

    log_dir = new_log_dir()
    stack = Stack(stack_processes(python=python, host=args.host, port=args.port), env=env, log_dir=log_dir)
    base = f"http://{args.host}:{args.port}"
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        stack.start_all()
        if wait_http(f"{base}/api/v1/health", 30) is None:
            print(f"error: the API did not come up; see {log_dir / 'api.log'}", file=sys.stderr)
            return 1
        print(
            f"\nCAO Gateway is running.\n"
            f"  API       {base}/api/v1/\n"
            f"  API docs  {base}/api/v1/docs\n"
            f"  Admin     {base}/admin/  (user {username}, password {password})\n"
            f"  Logs      {log_dir} (also .run/logs/latest)\n"
            f"Press Ctrl-C to stop.\n",
            flush=True,
        )
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
        stack.stop_all()


if __name__ == "__main__":
    sys.exit(main())
