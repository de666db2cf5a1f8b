"""Fair shares and priority, from the API to the line: the field, the messages, real workers.

Real PostgreSQL, Redis, Dramatiq worker threads and the simulator over HTTP;
the line's own rules are in tests/test_fair_line.py.
"""

import json
from dataclasses import replace

import dramatiq
import pytest
from django.conf import settings

from api_keys.models import ApiKey
from api_keys.selectors import LanePolicy, lane_policy
from jobs.models import Job, JobEvent, JobStatus
from jobs.state import current_step, tenant_of
from orchestration.commands import submit_job
from orchestration.messages import handoff_payload, parse_handoff, step_message
from orchestration.per_process import get_limiter
from services_registry.models import Service
from tests.conftest import keyed_api_client

pytestmark = pytest.mark.django_db(transaction=True)

FEATURE = "business_plan"  # prompt_enhancer, fast_chat_llm, summarizer_pro, email_notifier


def create(api, **fields):
    return api.post("/api/v1/jobs", {"feature_name": FEATURE, "input_data": {"n": 1}, **fields}, format="json")


# --- The API ------------------------------------------------------------------------------------


@pytest.mark.parametrize("priority", [-11, 11, 10**6, True, "5", 2.5, None, [1]])
def test_a_bad_priority_is_a_400_naming_the_field_and_creates_nothing(api, registry, priority):
    response = create(api, priority=priority)

    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "INVALID_INPUT"
    assert "priority" in error["details"]
    assert not Job.objects.exists()


@pytest.mark.parametrize("priority", [-10, 0, 7, 10])
def test_a_priority_in_range_is_kept_and_shown(api, registry, priority):
    response = create(api, priority=priority)

    assert response.status_code == 201, response.content
    job_id = response.json()["job_id"]
    assert Job.objects.get(pk=job_id).priority == priority
    assert api.get(f"/api/v1/jobs/{job_id}").json()["priority"] == priority


def test_priority_defaults_to_zero(api, registry):
    job_id = create(api).json()["job_id"]

    assert Job.objects.get(pk=job_id).priority == 0
    assert api.get(f"/api/v1/jobs/{job_id}").json()["priority"] == 0


def test_the_schema_documents_priority(api):
    schema = api.get("/api/v1/schema?format=json").json()
    created = next(
        body for name, body in schema["components"]["schemas"].items() if "priority" in body.get("properties", {})
        and "feature_name" in body["properties"]
    )
    field = created["properties"]["priority"]

    assert (field["minimum"], field["maximum"], field["default"]) == (-10, 10, 0)
    assert "CAO_PRIORITY_AGING_S" in field["description"]


# --- Where a step stands in line travels with it -----------------------------------------------


def test_a_step_message_carries_its_jobs_tenant_and_priority(registry, client_key):
    job, _ = submit_job(feature_name=FEATURE, input_data={}, owner=client_key, priority=4)
    step = current_step(job)

    assert (step.tenant, step.priority) == (str(client_key.pk), 4)
    message = step_message(
        queue="default", job_id=job.id, step_index=0, token=1, service=step.service, tenant=step.tenant,
        priority=step.priority,
    )
    assert message.args == (str(job.id), 0, 1, step.service, str(client_key.pk), 4)
    assert parse_handoff(handoff_payload(step)) == replace(step, job_id=str(job.id))


def test_a_job_without_an_owner_is_the_default_tenant(registry):
    job, _ = submit_job(feature_name=FEATURE, input_data={})

    assert tenant_of(job) == ""


def test_a_hand_off_left_before_steps_carried_their_place_in_line_still_parses(registry):
    step = parse_handoff(json.dumps(["7b0c", 2, 5, "fast_chat_llm"]))

    assert (step.job_id, step.step_index, step.token, step.service, step.tenant, step.priority) == (
        "7b0c", 2, 5, "fast_chat_llm", "", 0,
    )


def test_a_keys_lane_policy_is_read_from_its_row_and_defaults_to_no_limits(client_key):
    assert lane_policy(str(client_key.pk)) == LanePolicy(weight=1, cap=0)
    ApiKey.objects.filter(pk=client_key.pk).update(share_weight=5, max_calls_per_service=3)

    assert lane_policy(str(client_key.pk)) == LanePolicy(weight=5, cap=3)  # the tests' CAO_REGISTRY_CACHE_S is 0
    assert lane_policy("") == LanePolicy(weight=1, cap=0)
    assert lane_policy("999999") == LanePolicy(weight=1, cap=0)  # a key deleted since


def sent_step_message(queue, job_id):
    """The step message of ``job_id`` waiting in ``queue`` of the broker, as a worker would receive it."""
    broker = dramatiq.get_broker()
    for body in broker.client.hvals(f"{broker.namespace}:{queue}.msgs"):
        message = dramatiq.Message.decode(body)
        if message.args[0] == job_id:
            return message
    raise AssertionError(f"no message of {job_id} in {queue}")


def test_a_parked_step_waits_in_its_tenants_lane_with_its_priority(registry, client_key):
    # Given prompt_enhancer's only slot taken,
    Service.objects.filter(name="prompt_enhancer").update(concurrency_limit=1)
    limiter = get_limiter()
    assert limiter.acquire("prompt_enhancer", "other:0:1", limit=1, ttl_s=60, payload="other").granted
    job_id = create(keyed_api_client(client_key), priority=3).json()["job_id"]

    # when a worker runs the job's first message as the broker holds it, through its actor,
    from orchestration.actors import STEP_ACTORS

    message = sent_step_message("default", job_id)
    STEP_ACTORS["default"].fn(*message.args, **message.kwargs)

    # the step parks in its key's lane, ordered by its priority.
    assert Job.objects.get(pk=job_id).step_state == "WAITING"
    lane_of = limiter.keys("prompt_enhancer")[15]
    (entry,) = [value for member, value in limiter.client.hgetall(lane_of).items() if _text(member).startswith(job_id)]
    tenant, order, member = _text(entry).split(":", 2)
    assert tenant == str(client_key.pk)
    # Its order is its arrival moved 3 points of aging earlier.
    arrival_us = limiter.client.zscore(limiter.keys("prompt_enhancer")[2], member)
    assert int(order) == int(arrival_us) - 3 * int(settings.CAO_PRIORITY_AGING_S * 1_000_000)


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


# --- Real workers ---------------------------------------------------------------------------


def llm_call_owners(simulator):
    """The job of each fast_chat_llm call, in the order the calls reached the service."""
    calls = simulator.requests("fast_chat_llm", kind="execute")
    return [call["json"]["meta"]["job_id"] for call in sorted(calls, key=lambda call: call["seq"])]


def waiting(jobs):
    return {str(pk) for pk in Job.objects.filter(pk__in=[job.pk for job in jobs], step_state="WAITING").values_list(
        "pk", flat=True
    )}


def wait_completed(wait, jobs):
    wait(
        lambda: Job.objects.filter(pk__in=[job.pk for job in jobs], status=JobStatus.COMPLETED).count() == len(jobs),
        timeout=60, message="every job to complete",
    )


def test_a_tenants_few_jobs_are_served_between_another_tenants_flood(registry, simulator, worker, wait):
    # Given one slot of fast_chat_llm and a flood of 16 jobs from key A in its line,
    Service.objects.filter(name="fast_chat_llm").update(concurrency_limit=1)
    simulator.configure(latency={"fast_chat_llm": "200ms"})
    flood_key, _ = ApiKey.objects.create_key(name="flood")
    few_key, _ = ApiKey.objects.create_key(name="few")
    flood = [submit_job(feature_name=FEATURE, input_data={"n": i}, owner=flood_key)[0] for i in range(16)]
    wait(lambda: len(waiting(flood)) >= 10, message="the flood to fill the line")
    # when key B's two jobs arrive behind it,
    in_line = waiting(flood)
    few = [submit_job(feature_name=FEATURE, input_data={"n": i}, owner=few_key)[0] for i in range(2)]

    wait_completed(wait, flood + few)
    owners = llm_call_owners(simulator)
    # they take turns with the flood: of the flood's jobs already in line,
    # a first-come line would call all (10 or more) before them; taking turns,
    # two at most (plus the one or two called while B's jobs took their first step).
    last_of_few = max(owners.index(str(job.pk)) for job in few)
    overtaken_by = [job_id for job_id in owners[:last_of_few] if job_id in in_line]
    assert len(overtaken_by) <= 4, (len(in_line), owners)
    assert simulator.stats()["fast_chat_llm"]["max_in_flight"] == 1


def test_a_higher_priority_job_overtakes_its_own_keys_waiting_jobs(registry, simulator, worker, wait):
    Service.objects.filter(name="fast_chat_llm").update(concurrency_limit=1)
    simulator.configure(latency={"fast_chat_llm": "200ms"})
    key, _ = ApiKey.objects.create_key(name="one tenant")
    batch = [submit_job(feature_name=FEATURE, input_data={"n": i}, owner=key)[0] for i in range(12)]
    wait(lambda: len(waiting(batch)) >= 8, message="the batch to fill the line")
    in_line = waiting(batch)
    urgent = submit_job(feature_name=FEATURE, input_data={"urgent": True}, owner=key, priority=10)[0]

    wait_completed(wait, [*batch, urgent])
    owners = llm_call_owners(simulator)
    # 10 points of priority are 100 s of waiting: it goes before every job
    # that was in line, but the one or two handed the slot while it took its first step.
    overtaken_by = [job_id for job_id in owners[: owners.index(str(urgent.pk))] if job_id in in_line]
    assert len(overtaken_by) <= 2, (len(in_line), owners)


# --- The admin ----------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.com", "pw"))
    return client


def key_form(api_key, **fields):
    return {
        "name": api_key.name, "is_active": "on", "share_weight": api_key.share_weight,
        "max_calls_per_service": api_key.max_calls_per_service, "max_concurrent_jobs": api_key.max_concurrent_jobs,
        **fields,
    }


@pytest.mark.parametrize(
    "field, value",
    [
        ("share_weight", "0"), ("share_weight", "-1"), ("share_weight", "101"), ("share_weight", "heavy"),
        ("share_weight", ""), ("max_calls_per_service", "-1"), ("max_calls_per_service", "100001"),
        ("max_calls_per_service", "few"), ("max_concurrent_jobs", "-1"), ("max_concurrent_jobs", "100001"),
        ("max_concurrent_jobs", "many"), ("max_concurrent_jobs", ""),
    ],
)
def test_a_bad_lane_setting_is_a_form_error_and_changes_nothing(admin_client, client_key, field, value):
    response = admin_client.post(f"/admin/api_keys/apikey/{client_key.pk}/change/", key_form(client_key, **{field: value}))

    assert response.status_code == 200  # the form again, with its errors
    assert field in response.context["adminform"].form.errors
    client_key.refresh_from_db()
    assert (client_key.share_weight, client_key.max_calls_per_service, client_key.max_concurrent_jobs) == (1, 0, 0)


def test_the_admin_sets_a_share_weight(admin_client, client_key):
    response = admin_client.post(
        f"/admin/api_keys/apikey/{client_key.pk}/change/",
        key_form(client_key, share_weight="4", max_calls_per_service="2", max_concurrent_jobs="7"),
    )

    assert response.status_code == 302, response.content
    client_key.refresh_from_db()
    assert (client_key.share_weight, client_key.max_calls_per_service, client_key.max_concurrent_jobs) == (4, 2, 7)
    assert lane_policy(str(client_key.pk)) == LanePolicy(weight=4, cap=2, job_cap=7)
    assert "share" in admin_client.get("/admin/api_keys/apikey/").content.decode().lower()


def test_a_keys_cap_lets_other_keys_jobs_pass_its_waiting_ones(registry, simulator, worker, wait):
    # Given fast_chat_llm with 3 slots and a key capped at 1 call per service,
    Service.objects.filter(name="fast_chat_llm").update(concurrency_limit=3)
    simulator.configure(latency={"fast_chat_llm": "400ms"})
    capped, _ = ApiKey.objects.create_key(name="capped")
    ApiKey.objects.filter(pk=capped.pk).update(max_calls_per_service=1)
    other, _ = ApiKey.objects.create_key(name="other")
    capped_jobs = [submit_job(feature_name=FEATURE, input_data={"n": i}, owner=capped)[0] for i in range(6)]
    held = JobEvent.objects.filter(
        job_id__in=[job.pk for job in capped_jobs], type="WAITING_FOR_SLOT", payload__step_index=1
    )

    # whose jobs wait for its cap, not for a slot (two slots stay free),
    wait(lambda: held.count() >= 2, message="the capped key's jobs to wait for its cap")
    assert {event.payload["limit"] for event in held} == {"key_concurrency"}
    # another key's jobs take the free slots instead of queueing behind them.
    other_jobs = [submit_job(feature_name=FEATURE, input_data={"n": i}, owner=other)[0] for i in range(2)]

    wait_completed(wait, capped_jobs + other_jobs)
    assert {event.payload["limit"] for event in held} == {"key_concurrency"}
    owners = llm_call_owners(simulator)
    assert len(owners) == 8  # one call each: waiting spent no attempt
    capped_ids = {str(job.pk) for job in capped_jobs}
    capped_places = [index for index, job_id in enumerate(owners) if job_id in capped_ids]
    # One capped call at a time, 400 ms each: the other key's two were called before its last three.
    assert max(owners.index(str(job.pk)) for job in other_jobs) < capped_places[3], owners


def test_the_admin_shows_who_waits_in_a_line_in_the_order_it_is_served(registry, client_key):
    from ops.admin.services import describe_occupancy

    limiter = get_limiter()
    tenant = str(client_key.pk)
    assert limiter.acquire("fast_chat_llm", "h:0:1", limit=1, ttl_s=60, payload="h", tenant=tenant).granted
    for member, owner in (("a:0:1", tenant), ("b:0:1", tenant), ("c:0:1", "")):
        limiter.acquire("fast_chat_llm", member, limit=1, ttl_s=60, payload=member, tenant=owner)

    occupancy = limiter.occupancy("fast_chat_llm")

    # Both joined at the same virtual time; on a tie "" (no key) comes first.
    assert occupancy.waiting_by_tenant == (("", 1), (tenant, 2))
    shown = describe_occupancy(occupancy, limit=1)
    assert f"{client_key.name} 2" in shown and "no key 1" in shown
