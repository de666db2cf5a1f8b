"""Serve /metrics from a worker host that runs no API: `python manage.py serve_metrics --port 9464`."""

from django.core.management.base import BaseCommand
from prometheus_client import start_http_server

from orchestration.metrics_view import gateway_registry


class Command(BaseCommand):
    help = "Expose this host's gateway metrics (all processes sharing PROMETHEUS_MULTIPROC_DIR) over HTTP."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="0.0.0.0")
        parser.add_argument("--port", type=int, default=9464)

    def handle(self, *args, host, port, **options):
        server, thread = start_http_server(port, addr=host, registry=gateway_registry())
        self.stdout.write(f"Serving metrics on http://{host}:{port}/metrics")
        thread.join()
