"""Fuzzing: schemathesis against the project's own OpenAPI schema, and hypothesis over odd inputs."""

import json
import math
import os

import pytest
import schemathesis
from drf_spectacular.generators import SchemaGenerator
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from rest_framework.test import APIClient
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api_keys.models import ApiKey
from jobs.models import Job

# `make fuzz` raises these (CAO_FUZZ_EXAMPLES) and draws at random; under CI
# the draws are derandomized (tests/conftest.py), so a failure reruns alike.
EXAMPLES_PER_OPERATION = int(os.environ.get("CAO_FUZZ_EXAMPLES", "30"))
EXAMPLES_PER_INPUT_TEST = int(os.environ.get("CAO_FUZZ_EXAMPLES", "150"))
FUZZ = hypothesis_settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck)
)
ODD_INPUT = hypothesis_settings(
    max_examples=EXAMPLES_PER_INPUT_TEST, deadline=None, suppress_health_check=list(HealthCheck)
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


# Any text, lone surrogates included (hypothesis leaves them out by default),
# and any float, NaN and the infinities included: what a client can send.
TEXT = st.text(alphabet=st.characters(blacklist_categories=()), max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)


@pytest.mark.django_db
@given(input_data=JSON)
@ODD_INPUT
def test_any_json_as_input_data_is_accepted_or_refused_with_a_400(input_data, registry_once, keyed_client):
    # Sent as Python writes it: NaN and Infinity literals, surrogates as \ud800 escapes.
    body = json.dumps({"feature_name": "viral_video", "input_data": input_data})
    response = keyed_client.generic("POST", "/api/v1/jobs", body, content_type="application/json")

    assert response.status_code in (201, 400), response.content
    body = response.json()
    if response.status_code == 201:
        assert storable(input_data)
        stored = Job.objects.get(pk=body["job_id"]).context["initial_input"]
        assert as_numbers(stored) == as_numbers(input_data)
    else:
        assert body["success"] is False and body["error"]["code"] in ("INVALID_INPUT", "MALFORMED_JSON")
        assert not storable(input_data) or body["error"]["code"] == "INVALID_INPUT"


def storable(value):
    """Whether jsonb can keep ``value``: finite numbers, no NUL, valid Unicode."""
    if isinstance(value, dict):
        return all(storable(key) and storable(item) for key, item in value.items())
    if isinstance(value, list):
        return all(storable(item) for item in value)
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value and not any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    return True


@pytest.mark.django_db
@given(job_id=st.text(max_size=60) | st.uuids().map(str))
@ODD_INPUT
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


def test_an_empty_filter_is_valid_by_the_schema_and_by_the_api(keyed_client):
    # The API reads ?feature_name= as "any feature"; the published schema
    # must agree, or a schema-driven client (or fuzzer) calls it invalid.
    from jsonschema import Draft202012Validator

    [parameter] = [
        p for p in schema.raw_schema["paths"]["/api/v1/jobs"]["get"]["parameters"] if p["name"] == "feature_name"
    ]
    validator = Draft202012Validator(parameter["schema"])

    assert validator.is_valid("") and validator.is_valid("business_plan")
    assert not validator.is_valid("no spaces") and not validator.is_valid("x" * 65)
    assert keyed_client.get("/api/v1/jobs", {"feature_name": ""}).status_code == 200
    assert keyed_client.get("/api/v1/jobs", {"feature_name": "no spaces"}).status_code == 400
