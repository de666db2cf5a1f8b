"""Fuzzing: schemathesis against the project's own OpenAPI schema, and hypothesis over odd inputs."""

import json

import pytest
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api_keys.models import ApiKey
from jobs.models import Job

EXAMPLES_PER_OPERATION = 30
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck), database=None
)

schema = schemathesis.openapi.from_dict(SchemaGenerator().get_schema(request=None, public=True))


@pytest.fixture
def fuzz_target(asgi_server, registry, simulator, settings):
    """A live server, an API key, and no throttling (the fuzzer is one fast client)."""
    settings.CAO_THROTTLE_RATES = {}
    _, raw_key = ApiKey.objects.create_key(name="fuzzer", is_staff=True)
    return asgi_server.base_url, raw_key


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@schema.parametrize()
@FUZZ
def test_no_operation_answers_5xx_or_breaks_its_schema(case, fuzz_target):
    base_url, raw_key = fuzz_target
    response = case.call(base_url=base_url, headers={"X-API-Key": raw_key}, timeout=10)

    assert response.status_code < 500, response.text
    # Some valid-looking requests are rightly refused: a made-up cursor (an
    # opaque token), or a well-formed name of a feature that does not exist.
    refusable = (case.query or {}).get("cursor") or (case.method == "POST" and case.path == "/api/v1/jobs")
    excluded = [positive_data_acceptance] if refusable else []
    case.validate_response(response, excluded_checks=excluded)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@pytest.mark.django_db
@given(input_data=JSON)
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_json_as_input_data_is_accepted_or_refused_with_a_400(input_data, registry_once, keyed_client):
    response = keyed_client.post(
        "/api/v1/jobs", {"feature_name": "viral_video", "input_data": input_data}, format="json"
    )

    assert response.status_code in (201, 400), response.content
    body = response.json()
    if response.status_code == 201:
        stored = Job.objects.get(pk=body["job_id"]).context["initial_input"]
        assert as_numbers(stored) == as_numbers(input_data)
    else:
        assert body["success"] is False and body["error"]["code"] == "INVALID_INPUT"


@pytest.mark.django_db
@given(job_id=st.text(max_size=60) | st.uuids().map(str))
@hypothesis_settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_any_job_id_is_a_404_in_the_error_shape(job_id, keyed_client):
    from urllib.parse import quote

    for method, suffix in (("get", ""), ("post", "/resume"), ("post", "/cancel"), ("get", "/events")):
        response = getattr(keyed_client, method)(f"/api/v1/jobs/{quote(job_id, safe='')}{suffix}")
        assert response.status_code == 404, (job_id, suffix, response.content)
        assert json.loads(response.content)["success"] is False


def as_numbers(value):
    """JSON with every number as a float: jsonb keeps values, not int/float spelling."""
    if isinstance(value, dict):
        return {key: as_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_numbers(item) for item in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@pytest.fixture
def registry_once(registry):
    return registry


@pytest.fixture
def keyed_client(db, settings):
    settings.CAO_THROTTLE_RATES = {}
    _, raw_key = ApiKey.objects.create_key(name="hypothesis")
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=raw_key)
    return client
