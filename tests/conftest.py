"""Shared fixtures: real PostgreSQL (pytest-django), real Redis, real Dramatiq
workers and the service simulator over real HTTP."""

import threading
import time

import dramatiq
import pytest
from django.db import connections
from rest_framework.test import APIClient

from api_keys.models import ApiKey
from common.redis import get_redis
from services_registry import reference
from services_registry.models import Recipe, RecipeStep, Service


@pytest.fixture(autouse=True)
def redis_db():
    """The tests' Redis database (db 15 unless REDIS_URL says otherwise), empty."""
    client = get_redis()
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def registry(db):
    """The reference services and recipes (restored after transactional tests flush them)."""
    reference.seed(Service, Recipe, RecipeStep)
    return {service.name: service for service in Service.objects.all()}


@pytest.fixture
def staff_key(db):
    api_key, raw_key = ApiKey.objects.create_key(name="staff", is_staff=True)
    api_key.raw_key = raw_key
    return api_key


@pytest.fixture
def client_key(db):
    api_key, raw_key = ApiKey.objects.create_key(name="client")
    api_key.raw_key = raw_key
    return api_key


@pytest.fixture
def api(client_key):
    """A DRF client authenticated with a (non-staff) API key."""
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=client_key.raw_key)
    client.api_key = client_key
    return client


@pytest.fixture
def staff_api(staff_key):
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=staff_key.raw_key)
    client.api_key = staff_key
    return client


@pytest.fixture(scope="session")
def simulator_process():
    """One simulator of the five services for the whole run, on a free port."""
    from simulator.testing import SimulatorProcess

    with SimulatorProcess() as process:
        yield process


@pytest.fixture
def simulator(simulator_process, settings):
    """The simulator, reset, with every service's URL pointed at it."""
    simulator_process.reset(config=True)
    settings.CAO_SERVICE_URL_OVERRIDES = {
        name: simulator_process.base_url(name) for name, *_ in reference.SERVICES
    }
    return simulator_process


@pytest.fixture
def fast_retries(settings):
    """Retry backoff short enough for tests."""
    settings.CAO_RETRY_BASE_DELAY_S = 0.05
    settings.CAO_RETRY_MAX_DELAY_S = 0.2
    return settings


@pytest.fixture
def worker(transactional_db, redis_db):
    """A real Dramatiq worker (threads in this process) on the real Redis broker."""
    import orchestration.actors  # noqa: F401  (declares the step actors and their queues)

    broker = dramatiq.get_broker()
    broker.flush_all()
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    yield worker
    worker.stop(timeout=10_000)
    # Each Worker registers a middleware on the global broker; drop this one so
    # the next test's worker starts from a clean broker.
    broker.middleware = [m for m in broker.middleware if getattr(m, "worker", None) is not worker]
    connections.close_all()


class AsgiServer:
    """The project's ASGI application served by uvicorn in a thread of this process.

    Being in-process, it sees the test database pytest-django set up.
    """

    def __init__(self):
        import socket

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            "cao_project.asgi:application", lifespan="off", log_level="warning", ws_ping_interval=None
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self):
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=10, message="the ASGI server to start")
        return self

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def asgi_server(transactional_db):
    # As in production (asgi.py), the ASGI server keeps no persistent DB
    # connections: its executor threads would otherwise hold them open.
    database = connections.settings["default"]
    saved, database["CONN_MAX_AGE"] = database["CONN_MAX_AGE"], 0
    server = AsgiServer().start()
    yield server
    server.stop()
    database["CONN_MAX_AGE"] = saved
    connections.close_all()


def wait_for(predicate, *, timeout=20.0, interval=0.05, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {message}")


@pytest.fixture
def wait():
    return wait_for

