"""``python manage.py simulate_services``: serve the five downstream services on one port."""

import random
import re
import signal
from contextlib import contextmanager

from django.core.management.base import BaseCommand, CommandError

from services_registry.reference import SERVICES
from simulator.app import CONTROL_PREFIX, EXECUTE_PATH
from simulator.errors import KnobError
from simulator.knobs import KNOBS, config_apply, parse_assignments
from simulator.server import (
    DEFAULT_GRACEFUL_TIMEOUT_S,
    SimulatorServer,
    app_build,
    bind_socket,
    root_url,
    service_env_name,
    service_urls,
)

_SERVICE_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")
_KNOB_HELP = {
    "latency": "delay every reply, e.g. fast_chat_llm=200ms or '*=50ms~10ms'",
    "fail": "answer a status instead of succeeding, e.g. summarizer_pro=503x2 (first 2 calls per key) or =400",
    "retry_after": "send Retry-After with the 429/503 of fail, e.g. fast_chat_llm=2s",
    "hang": "sleep before answering, e.g. video_gen_v2=30s or =30sx1; SERVICE alone hangs for an hour",
    "malformed": "answer 200 with a broken body: SERVICE (not JSON), SERVICE=nostatus or =empty, optional xN",
    "health_fail": "make GET /health answer a status, e.g. email_notifier=503",
    "health_hang": "make GET /health sleep, e.g. email_notifier=10s; SERVICE alone hangs for an hour",
}


@contextmanager
def _stop_on_signals(server):
    """Let SIGINT/SIGTERM stop the server and end the command with status 0.

    uvicorn installs its own handlers while serving and, once shut down,
    re-raises the signal it caught to the handler that was there before; this
    one makes that a no-op. It also covers a signal arriving before serving.
    """

    def stop(signum, frame):
        server.should_exit = True

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class Command(BaseCommand):
    help = (
        "Simulate the downstream AI services on one port, each under /<service>, with knobs for "
        "latency, failures, hangs and malformed replies, and a control API under /_sim."
    )
    # Needs neither the database nor the system checks: it must start anywhere.
    requires_system_checks = []

    def add_arguments(self, parser):
        add = parser.add_argument
        add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
        add("--port", type=int, default=9100, help="port to listen on; 0 picks a free one (default 9100)")
        for kind in KNOBS:
            add(
                f"--{kind.replace('_', '-')}",
                dest=kind,
                action="append",
                default=[],
                metavar="SERVICE[=VALUE]",
                help=_KNOB_HELP[kind] + " (repeatable; SERVICE may be *)",
            )
        add("--api-key", default="", help="require this key as 'Authorization: Bearer KEY' or in --api-key-header")
        add("--api-key-header", default="X-API-Key", help="header that may carry the API key (default X-API-Key)")
        add("--execute-path", default=EXECUTE_PATH, help=f"path of step calls (default {EXECUTE_PATH})")
        add("--extra-service", action="append", default=[], metavar="NAME", help="also simulate NAME (repeatable)")
        add("--seed", type=int, default=None, help="seed of the latency jitter, for repeatable runs")
        add("--request-log-size", type=int, default=1000, help="requests kept for /_sim/requests (default 1000)")
        add(
            "--graceful-timeout",
            type=float,
            default=DEFAULT_GRACEFUL_TIMEOUT_S,
            help=f"seconds to let replies finish on shutdown (default {DEFAULT_GRACEFUL_TIMEOUT_S})",
        )
        add("--access-log", action="store_true", help="log every request")

    def handle(self, *args, **options):
        services = self._services(options["extra_service"])
        config = self._config(options, services)
        if not options["execute_path"].startswith("/"):
            raise CommandError(f"--execute-path must start with '/', got {options['execute_path']!r}")
        if options["request_log_size"] < 1:
            raise CommandError("--request-log-size must be at least 1")
        app = app_build(
            services,
            config=config,
            api_key=options["api_key"] or None,
            api_key_header=options["api_key_header"],
            execute_path=options["execute_path"],
            request_log_size=options["request_log_size"],
            rng=random.Random(options["seed"]),
        )
        try:
            sock = bind_socket(options["host"], options["port"])
        except OSError as exc:
            raise CommandError(f"cannot listen on {options['host']}:{options['port']}: {exc}") from None
        self._announce(root_url(sock), services, app, options)
        server = SimulatorServer(app, access_log=options["access_log"], graceful_timeout_s=options["graceful_timeout"])
        with _stop_on_signals(server):
            server.run(sockets=[sock])
        self.stdout.write("Simulator stopped.")

    def _services(self, extra):
        services = [service[0] for service in SERVICES]
        for name in extra:
            if not _SERVICE_NAME.fullmatch(name):
                raise CommandError(f"--extra-service {name!r}: use lower-case letters, digits, '_' and '-'")
            if name not in services:
                services.append(name)
        return services

    def _config(self, options, services):
        changes = {}
        try:
            for kind in KNOBS:
                changes.update(parse_assignments(kind, options[kind], services))
        except KnobError as exc:
            raise CommandError(str(exc)) from None
        return config_apply({}, changes)

    def _announce(self, url, services, app, options):
        write = self.stdout.write
        write(f"Simulator listening on {url}")
        for service, base in service_urls(url, services).items():
            write(f"  {service:<16} {base}  (POST {app.execute_path}, GET /health)")
        write(f"Control API: {url}{CONTROL_PREFIX}/ (health, stats, reset, config, requests)")
        knobs = {service: knobs.as_json() for service, knobs in app.state.config.items() if knobs.as_json()}
        for service, values in knobs.items():
            write(f"Knobs of {service}: " + ", ".join(f"{kind}={value}" for kind, value in values.items()))
        if app.api_key:
            write(f"API key required: 'Authorization: Bearer <key>' or '{options['api_key_header']}: <key>'")
        write("Environment for the gateway:")
        for service, base in service_urls(url, services).items():
            write(f"{service_env_name(service)}={base}")
        self.stdout.flush()
