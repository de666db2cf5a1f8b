"""Inputs that once answered 500: each gets the documented 4xx body, or a WebSocket close code."""

import asyncio
import base64
import json
from urllib.parse import urlencode

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from jobs.models import Job

pytestmark = pytest.mark.django_db


def post_raw(api, body):
    return api.generic("POST", "/api/v1/jobs", body.encode("utf-8", "surrogatepass"), content_type="application/json")


def error_code(response):
    return response.json()["error"]["code"]


@pytest.mark.parametrize(
    "body",
    [
        '{"feature_name": "business_plan", "input_data": {"a": 1e999}}',
        '{"feature_name": "business_plan", "input_data": {"a": [-1e400]}}',
        '{"feature_name": "business_plan", "input_data": {"a": Infinity}}',
        '{"feature_name": "business_plan", "input_data": {"a": -Infinity}}',
    ],
)
def test_a_number_jsonb_cannot_store_is_a_400(api, registry, body):
    response = post_raw(api, body)

    assert response.status_code == 400 and error_code(response) == "MALFORMED_JSON"
    assert "JSON" in response.json()["error"]["message"]
    assert not Job.objects.exists()


@pytest.mark.parametrize(
    "body",
    [
        r'{"feature_name": "business_plan", "input_data": {"a": "\ud800"}}',
        r'{"feature_name": "business_plan", "input_data": {"\udfff": 1}}',
        r'{"feature_name": "business_plan", "input_data": {"a": ["ok", {"b": "x\udbff"}]}}',
    ],
)
def test_a_lone_surrogate_in_input_data_is_a_400(api, registry, body):
    response = post_raw(api, body)

    assert response.status_code == 400 and error_code(response) == "INVALID_INPUT"
    assert "surrogate" in response.json()["error"]["message"]
    assert not Job.objects.exists()


def test_a_valid_surrogate_pair_is_just_a_character(api, registry):
    response = post_raw(api, r'{"feature_name": "business_plan", "input_data": {"emoji": "\ud83d\ude00"}}')

    assert response.status_code == 201
    assert Job.objects.get().context["initial_input"] == {"emoji": "\U0001f600"}


@pytest.mark.parametrize("position", ["p=notadate", "p=2026-13-45T99:99:99", "o=1&r=0&p=99999-01-01"])
def test_a_crafted_cursor_is_a_400(api, registry, position):
    cursor = base64.b64encode(position.encode()).decode()

    response = api.get("/api/v1/jobs?" + urlencode({"cursor": cursor}))

    assert response.status_code == 400 and error_code(response) == "INVALID_INPUT"
    assert response.json()["error"]["details"] == {"cursor": "invalid"}


def test_a_cursor_from_a_real_page_still_works(api, registry):
    for number in range(3):
        assert post_raw(api, json.dumps({"feature_name": "business_plan", "input_data": {"n": number}})).status_code == 201

    first = api.get("/api/v1/jobs", {"limit": 2}).json()
    second = api.get(first["next"]).json()

    assert len(first["results"]) == 2 and len(second["results"]) == 1


def test_a_django_validation_error_reaching_the_api_is_a_400(rf):
    from django.core.exceptions import ValidationError

    from common.api_errors import exception_handler

    response = exception_handler(ValidationError("bad value"), {})

    assert response.status_code == 400
    assert response.data["error"]["code"] == "INVALID_INPUT"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["/ws/", "/ws/a/b", "/ws", "/elsewhere", "/ws/a/b/"])
def test_a_websocket_to_an_unknown_path_closes_with_4404(asgi_server, path):
    async def scenario():
        async with connect(asgi_server.ws_url + path, open_timeout=10) as socket:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(socket.recv(), 10)
        return closed.value.rcvd.code

    assert asyncio.run(scenario()) == 4404
