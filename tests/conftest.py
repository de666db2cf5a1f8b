"""Shared fixtures: real PostgreSQL (pytest-django), real Redis, real Dramatiq
workers and the service simulator over real HTTP."""

import os
import threading

import dramatiq
import pytest
from django.db import connections
from hypothesis import settings as hypothesis_settings
from rest_framework.test import APIClient

from api_keys.models import ApiKey
from common.redis import get_redis
from services_registry import reference
from scripts.testbed import PrivateRedis, Testbed, wait_until, with_database
from services_registry.models import Recipe, RecipeStep, Service


# Property-based tests: under CI every draw is reproducible (derandomize:
# the seed comes from the test itself), so a red CI is a real failure that
# reruns the same way. `make fuzz` explores with fresh random draws instead.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
hypothesis_settings.register_profile("explore", database=None, print_blob=True)
hypothesis_settings.load_profile(
    os.environ.get("CAO_HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI", "").lower() == "true" else "default")
)


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


def keyed_api_client(api_key):
    """A DRF client that sends ``api_key`` (which carries its raw key) on every request."""
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=api_key.raw_key)
    client.api_key = api_key
    return client


@pytest.fixture
def api(client_key):
    """A DRF client authenticated with a (non-staff) API key."""
    return keyed_api_client(client_key)


@pytest.fixture
def staff_api(staff_key):
    """A DRF client authenticated with a staff API key."""
    return keyed_api_client(staff_key)


@pytest.fixture(scope="session", autouse=True)
def live_readers(django_db_setup):
    """The live readers' threads (jobs.live_reads) let go of their connections before the test database is dropped."""
    from jobs import live_reads

    yield
    live_reads.shut_down()


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


RABBITMQ_URL = os.environ.get("CAO_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")


@pytest.fixture
def broker_kind():
    """Which broker the worker fixture uses; test modules override it to run on both."""
    return "redis"


def rabbitmq_broker():
    """A RabbitMQ broker with the project's middleware and step actors.

    Unreachable: a skip with the reason (a failure under CI=true). Reachable
    but refusing the credentials or vhost: an error, never a skip.
    """
    import pika
    from django.conf import settings
    from django_dramatiq.utils import load_middleware
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    from orchestration.actors import STEP_ACTORS
    from tests.requirements import require

    where = RABBITMQ_URL.split("@")[-1]
    parameters = pika.URLParameters(RABBITMQ_URL)
    parameters.connection_attempts, parameters.retry_delay, parameters.socket_timeout = 1, 0, 2
    try:
        pika.BlockingConnection(parameters).close()
    except (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError) as exc:
        pytest.fail(
            f"RabbitMQ at {where} refused the login of CAO_TEST_RABBITMQ_URL ({exc.__class__.__name__}): "
            "fix the user, password or vhost",
            pytrace=False,
        )
    except pika.exceptions.AMQPError as exc:
        require(False, f"RabbitMQ not reachable at {where} ({exc.__class__.__name__}); `make test` starts it")
    broker = RabbitmqBroker(
        url=RABBITMQ_URL, middleware=[load_middleware(path) for path in settings.DRAMATIQ_MIDDLEWARE]
    )
    from webhooks.actors import deliver_webhooks

    for actor in (*STEP_ACTORS.values(), deliver_webhooks):
        broker.declare_actor(actor)
    return broker


@pytest.fixture
def worker(transactional_db, redis_db, broker_kind):
    """A real Dramatiq worker (threads in this process) on a real broker (Redis, or RabbitMQ)."""
    import orchestration.actors  # noqa: F401  (declares the step actors and their queues)
    import webhooks.actors  # noqa: F401  (and the webhook delivery actor on its queue)

    configured = dramatiq.get_broker()
    broker = rabbitmq_broker() if broker_kind == "rabbitmq" else configured
    dramatiq.set_broker(broker)
    broker.flush_all()
    worker = dramatiq.Worker(broker, worker_threads=8, worker_timeout=50)
    worker.start()
    yield worker
    worker.stop(timeout=10_000)
    # Each Worker registers a middleware on its broker; drop this one so the
    # next test's worker starts from a clean broker.
    broker.middleware = [m for m in broker.middleware if getattr(m, "worker", None) is not worker]
    if broker is not configured:
        broker.close()
        dramatiq.set_broker(configured)
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
    """Poll ``predicate`` until it returns a truthy value; TimeoutError after ``timeout``."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=message)


@pytest.fixture
def wait():
    return wait_for



# --- The real stack as separate processes (tests marked e2e) ---------------------------------

FAST_RECOVERY = {
    "SANITY_CHECK_INTERVAL_SECONDS": "1",
    "CAO_REDISPATCH_GRACE_S": "2",
    "CAO_RETRY_BASE_DELAY_S": "0.1",
    "CAO_RETRY_MAX_DELAY_S": "0.5",
    "CAO_HANDOFF_TTL_S": "3",
    "CAO_BROKER_HEARTBEAT_TIMEOUT_MS": "3000",
    "CAO_THROTTLE_RATE": "none",
    "CAO_JOB_CREATE_THROTTLE_RATE": "none",
    "LOG_LEVEL": "INFO",
}


@pytest.fixture
def private_redis():
    """A redis-server of the test's own, so restarting it touches nothing else."""
    server = PrivateRedis().start()
    yield server
    server.close()


@pytest.fixture
def testbed(private_redis, tmp_path, settings):
    """A factory of Testbeds: the stack's processes against the private Redis and a dedicated database."""
    def make(**options):
        # Named after this run's test database, so concurrent runs never share it.
        e2e_database = f"{settings.DATABASES['default']['NAME']}_e2e"
        database_url = options.pop("database_url", with_database(settings.DATABASE_URL, e2e_database))
        return Testbed(
            database_url=database_url,
            redis_url=private_redis.url(0),
            log_dir=tmp_path / "logs",
            env={**FAST_RECOVERY, **options.pop("env", {})},
            **options,
        )

    return make




# --- Staff users with exactly the permissions the admin would grant them ------------------------


@pytest.fixture
def make_staff(django_user_model):
    """A factory of staff users: ``make_staff("ops", "jobs.view_job", password="pw")``."""
    from django.contrib.auth.models import Permission

    def make(username, *permissions, password="pw"):
        user = django_user_model.objects.create_user(username, password=password, is_staff=True)
        for permission in permissions:
            app_label, codename = permission.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return user

    return make
