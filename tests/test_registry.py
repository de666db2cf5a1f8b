"""The service registry: seeded data, validation shared by admin and models, registry API, health."""

import socket
import threading
import time

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from services_registry.models import Recipe, RecipeStep, Service
from services_registry.selectors import recipe_get, recipe_steps

pytestmark = pytest.mark.django_db


def service(**overrides):
    fields = dict(
        name="image_gen", queue="heavy", concurrency_limit=2, timeout_s=10, lease_ttl_s=20, max_attempts=3,
        base_url="http://image-gen:9000",
    )
    fields.update(overrides)
    return Service(**fields)


# --- Seeded reference configuration ------------------------------------------


def test_migration_seeds_exactly_the_reference_services():
    rows = list(
        Service.objects.order_by("name").values_list(
            "name", "queue", "concurrency_limit", "timeout_s", "lease_ttl_s", "max_attempts", "base_url", "enabled"
        )
    )

    assert rows == [
        ("email_notifier", "default", 100, 5, 15, 6, "http://email-notifier:9000", True),
        ("fast_chat_llm", "medium", 15, 15, 30, 5, "http://fast-chat:9000", True),
        ("prompt_enhancer", "default", 50, 5, 15, 6, "http://prompt-enhancer:9000", True),
        ("summarizer_pro", "medium", 10, 30, 60, 5, "http://summarizer:9000", True),
        ("video_gen_v2", "heavy", 2, 600, 660, 3, "http://video-gen:9000", True),
    ]
    assert set(Service.objects.values_list("execute_path", "health_path", "auth_type")) == {
        ("/v1/execute", "/health", "none")
    }


def test_migration_seeds_exactly_the_reference_recipes():
    recipes = {recipe.name: [s.name for s in recipe_steps(recipe)] for recipe in Recipe.objects.all()}

    assert recipes == {
        "business_plan": ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"],
        "viral_video": ["prompt_enhancer", "video_gen_v2", "email_notifier"],
    }


# --- Validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, field, fragment",
    [
        ({"queue": "gpu"}, "queue", "choose one of heavy, medium, default"),
        ({"lease_ttl_s": 10}, "lease_ttl_s", "must be greater than the timeout"),
        ({"concurrency_limit": 0}, "concurrency_limit", "greater than or equal to 1"),
        ({"max_attempts": 0}, "max_attempts", "greater than or equal to 1"),
        ({"execute_path": "v1/run"}, "execute_path", "must start with '/'"),
        ({"base_url": "not a url"}, "base_url", "Enter an http(s) URL"),
        ({"base_url": "ftp://files:21"}, "base_url", "Enter an http(s) URL"),
        ({"base_url": "http://host:99999"}, "base_url", "Enter an http(s) URL"),
        ({"auth_type": "api_key_header", "auth_header_name": " "}, "auth_header_name", "Name the header"),
    ],
)
def test_invalid_services_are_refused_with_a_message_that_says_what_to_fix(overrides, field, fragment):
    with pytest.raises(ValidationError) as raised:
        service(**overrides).full_clean()

    assert fragment in " ".join(raised.value.message_dict[field])


def test_database_refuses_a_lease_ttl_not_above_the_timeout_even_without_clean():
    with pytest.raises(IntegrityError), transaction.atomic():
        service(timeout_s=30, lease_ttl_s=30).save()


@pytest.mark.parametrize(
    "url", ["http://image-gen:9000", "https://llm.example.com/api", "http://127.0.0.1:9100/fast_chat_llm", "http://[::1]:80"]
)
def test_a_valid_service_passes(url):
    service(base_url=url).full_clean()


def test_recipe_steps_must_exist_and_use_enabled_services(registry):
    with pytest.raises(ValidationError, match="at least one step"):
        Recipe.validate_steps([])
    registry["video_gen_v2"].enabled = False
    with pytest.raises(ValidationError, match=r"disabled services \(video_gen_v2\)"):
        Recipe.validate_steps([registry["prompt_enhancer"], registry["video_gen_v2"]])


def test_stored_recipe_clean_checks_its_steps(registry):
    Service.objects.filter(name="video_gen_v2").update(enabled=False)

    with pytest.raises(ValidationError, match="video_gen_v2"):
        Recipe.objects.get(name="viral_video").full_clean()


def test_step_positions_are_unique_per_recipe(registry):
    recipe = Recipe.objects.get(name="viral_video")
    with pytest.raises(IntegrityError), transaction.atomic():
        RecipeStep.objects.create(recipe=recipe, position=0, service=registry["email_notifier"])


# --- Effective URL ---------------------------------------------------------------


def test_env_override_wins_over_the_stored_url(registry, settings):
    settings.CAO_SERVICE_URL_OVERRIDES = {"fast_chat_llm": "http://127.0.0.1:9100/fast_chat_llm/"}
    llm, video = registry["fast_chat_llm"], registry["video_gen_v2"]

    assert llm.url_env_var == "FAST_CHAT_LLM_URL"
    assert llm.execute_url == "http://127.0.0.1:9100/fast_chat_llm/v1/execute"
    assert llm.health_url == "http://127.0.0.1:9100/fast_chat_llm/health"
    assert video.url_override is None and video.execute_url == "http://video-gen:9000/v1/execute"


# --- Registry API ------------------------------------------------------------------


def test_features_lists_enabled_recipes_with_their_steps(api, registry):
    Recipe.objects.create(name="draft", description="hidden", enabled=False)

    body = api.get("/api/v1/features").json()

    assert body == [
        {
            "name": "business_plan",
            "description": recipe_get("business_plan").description,
            "steps": ["prompt_enhancer", "fast_chat_llm", "summarizer_pro", "email_notifier"],
            "total_steps": 4,
        },
        {
            "name": "viral_video",
            "description": recipe_get("viral_video").description,
            "steps": ["prompt_enhancer", "video_gen_v2", "email_notifier"],
            "total_steps": 3,
        },
    ]


def test_services_lists_limits_but_not_internal_urls(api, registry):
    body = api.get("/api/v1/services").json()

    assert [item["name"] for item in body] == sorted(registry)
    assert body[-1] == {
        "name": "video_gen_v2", "queue": "heavy", "concurrency_limit": 2, "timeout_s": 600.0,
        "lease_ttl_s": 660.0, "max_attempts": 3, "enabled": True,
    }


def test_registry_endpoints_need_a_key(client, registry):
    assert client.get("/api/v1/features").status_code == 401
    assert client.get("/api/v1/services").status_code == 401


def test_openapi_schema_and_docs_page_are_served(client):
    schema = client.get("/api/v1/schema")
    assert schema.status_code == 200
    text = schema.content.decode()
    for path in ("/api/v1/jobs", "/api/v1/jobs/{job_id}/resume", "/api/v1/health/services", "/api/v1/features"):
        assert path in text
    docs = client.get("/api/v1/docs")
    assert docs.status_code == 200 and b"swagger-ui" in docs.content


# --- Health --------------------------------------------------------------------------


class HangingServer:
    """Accepts connections, notes when each request arrives, never answers."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.arrivals = []
        self.connections = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.recv(4096)
            self.arrivals.append(time.monotonic())
            self.connections.append(conn)

    def close(self):
        self.sock.close()
        for conn in self.connections:
            conn.close()


def test_health_checks_run_concurrently(api, registry, settings):
    # Given five services that accept requests and never answer
    servers = {name: HangingServer() for name in registry}
    settings.CAO_SERVICE_URL_OVERRIDES = {name: f"http://127.0.0.1:{s.port}" for name, s in servers.items()}
    settings.CAO_HEALTH_TIMEOUT_S = 1.5
    try:
        # When the health endpoint checks them
        body = api.get("/api/v1/health/services").json()
    finally:
        for server in servers.values():
            server.close()

    # Then every request arrived before the first check could time out
    arrivals = sorted(t for server in servers.values() for t in server.arrivals)
    assert len(arrivals) == 5
    assert arrivals[-1] < arrivals[0] + settings.CAO_HEALTH_TIMEOUT_S
    assert body["ok"] is False
    for name in registry:
        result = body["services"][name]
        assert result["ok"] is False and "timed out" in result["error"]
        assert result["latency_ms"] >= 1400


def test_health_reports_status_codes_and_connection_errors(api, registry, simulator, settings):
    simulator.configure(health_fail={"summarizer_pro": "503"})
    settings.CAO_SERVICE_URL_OVERRIDES = {
        **settings.CAO_SERVICE_URL_OVERRIDES, "video_gen_v2": "http://127.0.0.1:9",
    }

    body = api.get("/api/v1/health/services").json()["services"]

    assert body["fast_chat_llm"]["ok"] is True and body["fast_chat_llm"]["status_code"] == 200
    assert body["summarizer_pro"] == {"ok": False, "status_code": 503, "latency_ms": body["summarizer_pro"]["latency_ms"]}
    assert body["video_gen_v2"]["ok"] is False and "refused" in body["video_gen_v2"]["error"].lower()


def test_readiness_checks_database_and_redis(client):
    assert client.get("/api/v1/health/ready").json() == {"ok": True, "database": "ok", "redis": "ok"}


def test_readiness_is_503_when_redis_is_down(client, settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"

    response = client.get("/api/v1/health/ready")

    assert response.status_code == 503
    assert response.json()["redis"].startswith("Redis is not reachable at redis://127.0.0.1:1/0")


@pytest.mark.django_db(transaction=True)  # no test transaction wraps the connection it repoints
def test_readiness_is_503_when_postgresql_is_down(client, settings):
    from django.db import connection

    from scripts.testbed import free_port

    # Given the process's database connection pointing at a port where no PostgreSQL listens
    port = free_port()
    settings.DATABASE_URL = f"postgresql://cao:hunter2@127.0.0.1:{port}/cao"
    saved = {key: connection.settings_dict[key] for key in ("HOST", "PORT", "USER", "PASSWORD")}
    connection.close()
    connection.settings_dict.update(HOST="127.0.0.1", PORT=port, USER="cao", PASSWORD="hunter2")
    try:
        # When a probe asks
        response = client.get("/api/v1/health/ready")
    finally:
        connection.close()
        connection.settings_dict.update(saved)

    # Then it is not ready, says why without the password, and Redis is still reported on its own
    assert response.status_code == 503
    body = response.json()
    assert body["ok"] is False and body["redis"] == "ok"
    assert body["database"].startswith(f"PostgreSQL is not reachable at postgresql://cao:***@127.0.0.1:{port}/cao")
    assert "hunter2" not in response.content.decode()
    # And once PostgreSQL answers again, so does readiness
    assert client.get("/api/v1/health/ready").status_code == 200


@pytest.mark.django_db
def test_hot_paths_read_every_service_in_one_query_per_cache_period(registry, settings, django_assert_num_queries):
    from common.row_cache import forget
    from services_registry.selectors import service_live

    settings.CAO_REGISTRY_CACHE_S = 60
    forget()
    with django_assert_num_queries(1):
        names = [service_live(name).name for name in registry]
        assert service_live("no_such_service") is None
    assert sorted(names) == sorted(registry)
