"""Serve /metrics from a worker host that runs no API: `python manage.py serve_metrics --port 9464`.

The same access rule as the API's /metrics: the bearer token when
CAO_METRICS_TOKEN is set, else only the addresses of CAO_METRICS_ALLOWED_IPS
(loopback by default).
"""

import json
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from django.core.management.base import BaseCommand
from prometheus_client import make_wsgi_app

from orchestration.metrics_view import FORBIDDEN_BODY, gateway_registry, scrape_allowed


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # scrapes every few seconds are not news
        pass


def guarded_app(registry):
    """prometheus_client's WSGI app behind the access rule."""
    serve = make_wsgi_app(registry)

    def app(environ, start_response):
        if not scrape_allowed(authorization=environ.get("HTTP_AUTHORIZATION"), remote_addr=environ.get("REMOTE_ADDR")):
            start_response("403 Forbidden", [("Content-Type", "application/json")])
            return [json.dumps(FORBIDDEN_BODY).encode()]
        return serve(environ, start_response)

    return app


class Command(BaseCommand):
    help = "Expose this host's gateway metrics (all processes sharing PROMETHEUS_MULTIPROC_DIR) over HTTP."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="0.0.0.0")
        parser.add_argument("--port", type=int, default=9464)

    def handle(self, *args, host, port, **options):
        server = make_server(
            host, port, guarded_app(gateway_registry()), server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        self.stdout.write(f"Serving metrics on http://{host}:{port}/metrics", ending="\n")
        self.stdout.flush()
        server.serve_forever()
