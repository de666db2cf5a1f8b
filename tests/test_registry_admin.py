"""Ops edit services and recipes in the admin; invalid edits are refused with messages."""

import pytest

from services_registry.models import Recipe, Service

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(client, django_user_model):
    user = django_user_model.objects.create_superuser("ops", "ops@example.com", "pw")
    client.force_login(user)
    return client


def service_form(service, **changes):
    data = {
        "name": service.name, "queue": service.queue, "enabled": "on" if service.enabled else "",
        "concurrency_limit": service.concurrency_limit, "timeout_s": service.timeout_s,
        "lease_ttl_s": service.lease_ttl_s, "max_attempts": service.max_attempts, "base_url": service.base_url,
        "execute_path": service.execute_path, "health_path": service.health_path,
        "auth_type": service.auth_type, "auth_header_name": service.auth_header_name,
        "breaker_threshold": service.breaker_threshold, "breaker_open_s": service.breaker_open_s,
        "requests_per_minute": service.requests_per_minute,
        "tokens_per_minute": service.tokens_per_minute, "tokens_per_call": service.tokens_per_call,
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value != ""}


def recipe_form(recipe, steps, **changes):
    data = {
        "name": recipe.name, "description": recipe.description, "enabled": "on",
        "steps-TOTAL_FORMS": len(steps), "steps-INITIAL_FORMS": 0, "steps-MIN_NUM_FORMS": 1,
        "steps-MAX_NUM_FORMS": 1000,
    }
    for index, (position, service) in enumerate(steps):
        data[f"steps-{index}-position"] = position
        data[f"steps-{index}-service"] = service.pk if service else ""
        data[f"steps-{index}-recipe"] = recipe.pk or ""
    data.update(changes)
    return data


def test_service_list_shows_limits_and_marks_env_overrides(staff, registry, settings):
    settings.CAO_SERVICE_URL_OVERRIDES = {"fast_chat_llm": "http://127.0.0.1:9100/fast_chat_llm"}

    page = staff.get("/admin/services_registry/service/").content.decode()

    for header in ("Queue", "Concurrency limit", "Timeout s", "Lease ttl s", "Max attempts", "Effective URL"):
        assert header.lower() in page.lower()
    assert "http://127.0.0.1:9100/fast_chat_llm" in page and "(from FAST_CHAT_LLM_URL)" in page
    assert "http://video-gen:9000" in page


def test_editing_a_limit_is_saved(staff, registry):
    llm = registry["fast_chat_llm"]

    response = staff.post(f"/admin/services_registry/service/{llm.pk}/change/", service_form(llm, concurrency_limit=3))

    assert response.status_code == 302
    assert Service.objects.get(pk=llm.pk).concurrency_limit == 3


def stored(service):
    """Every editable field of the service as stored."""
    return {
        field.name: getattr(Service.objects.get(pk=service.pk), field.name) for field in Service._meta.concrete_fields
    }


@pytest.mark.parametrize(
    "field, value, stored_value, message",
    [
        ("lease_ttl_s", 10, 30, "must be greater than the timeout"),
        ("concurrency_limit", 0, 15, "greater than or equal to 1"),
        ("queue", "gpu", "medium", "Select a valid choice"),
        ("base_url", "fast-chat", "http://fast-chat:9000", "Enter an http(s) URL"),
        ("breaker_threshold", -1, 0, "greater than or equal to 0"),
        ("requests_per_minute", -5, 0, "greater than or equal to 0"),
        ("requests_per_minute", "lots", 0, "Enter a whole number"),
        ("tokens_per_minute", -1, 0, "greater than or equal to 0"),
        ("tokens_per_minute", 10**12, 0, "less than or equal to"),
        ("tokens_per_call", 0, 1000, "greater than or equal to 1"),
        ("tokens_per_call", "some", 1000, "Enter a whole number"),
        ("breaker_open_s", 0, 30.0, "greater than or equal to 0.1"),
        ("breaker_open_s", "soon", 30.0, "Enter a number"),
    ],
)
def test_invalid_service_edits_are_refused_with_what_to_fix(staff, registry, field, value, stored_value, message):
    llm = registry["fast_chat_llm"]
    before = stored(llm)
    assert before[field] == stored_value

    response = staff.post(f"/admin/services_registry/service/{llm.pk}/change/", service_form(llm, **{field: value}))

    assert response.status_code == 200
    assert message in response.content.decode()
    # Nothing saved: neither the field this edit changed, nor any other.
    assert stored(llm)[field] == stored_value
    assert stored(llm) == before


def test_recipes_are_created_with_ordered_inline_steps(staff, registry):
    recipe = Recipe(name="quick_note", description="")
    steps = [(1, registry["email_notifier"]), (0, registry["prompt_enhancer"])]

    response = staff.post("/admin/services_registry/recipe/add/", recipe_form(recipe, steps))

    assert response.status_code == 302, response.content.decode()[:2000]
    created = Recipe.objects.get(name="quick_note")
    assert [s.service.name for s in created.steps.order_by("position")] == ["prompt_enhancer", "email_notifier"]


def test_recipe_with_no_steps_is_refused(staff, registry):
    response = staff.post(
        "/admin/services_registry/recipe/add/", recipe_form(Recipe(name="empty"), [], **{"steps-MIN_NUM_FORMS": 0})
    )

    assert response.status_code == 200
    assert "at least one step" in response.content.decode() or "Please submit at least 1 form" in response.content.decode()
    assert not Recipe.objects.filter(name="empty").exists()


def test_recipe_with_duplicate_positions_is_refused(staff, registry):
    steps = [(0, registry["prompt_enhancer"]), (0, registry["email_notifier"])]

    response = staff.post("/admin/services_registry/recipe/add/", recipe_form(Recipe(name="dup"), steps))

    assert "Two steps share position 0" in response.content.decode()
    assert not Recipe.objects.filter(name="dup").exists()


def test_recipe_using_a_disabled_service_is_refused(staff, registry):
    Service.objects.filter(name="video_gen_v2").update(enabled=False)
    steps = [(0, Service.objects.get(name="video_gen_v2"))]

    response = staff.post("/admin/services_registry/recipe/add/", recipe_form(Recipe(name="vid"), steps))

    assert "disabled services (video_gen_v2)" in response.content.decode()
    assert not Recipe.objects.filter(name="vid").exists()


def test_recipe_list_shows_the_step_chain(staff, registry):
    page = staff.get("/admin/services_registry/recipe/").content.decode()

    assert "prompt_enhancer → fast_chat_llm → summarizer_pro → email_notifier" in page


def test_switching_a_circuit_breaker_off_in_the_admin_closes_its_open_circuit(
    staff, registry, redis_db, django_capture_on_commit_callbacks
):
    from orchestration.per_process import get_limiter

    llm = registry["fast_chat_llm"]
    Service.objects.filter(pk=llm.pk).update(breaker_threshold=1)
    limiter = get_limiter()
    limiter.report_outcome("fast_chat_llm", "job:0:1", ok=False, threshold=1, open_s=600, limit=15)
    assert limiter.occupancy("fast_chat_llm").circuit == "open"
    llm.refresh_from_db()

    with django_capture_on_commit_callbacks(execute=True):
        response = staff.post(
            f"/admin/services_registry/service/{llm.pk}/change/", service_form(llm, breaker_threshold=0)
        )

    assert response.status_code == 302
    assert limiter.occupancy("fast_chat_llm").circuit == "closed"
