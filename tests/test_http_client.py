"""orchestration.http_client.parse_reply: status x body -> output or typed error, one row per case.

Replies are real ``requests.Response`` objects, built by requests' own
adapter from a urllib3 response, as ``ServiceClient.execute`` gets them.
"""

import datetime
import email.utils
import json
from io import BytesIO

import pytest
import requests
import urllib3
from requests.adapters import HTTPAdapter

from orchestration import errors
from orchestration.http_client import ServiceReply, parse_reply

SERVICE = "summarizer_pro"


def reply(status, body=None, *, raw=None, headers=None):
    """A Response to a step call, as requests builds it from the wire."""
    content = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    wire = urllib3.HTTPResponse(
        body=BytesIO(content),
        status=status,
        headers={"Content-Type": "application/json", "Content-Length": str(len(content)), **(headers or {})},
        preload_content=False,
    )
    request = requests.Request("POST", f"http://127.0.0.1:9/{SERVICE}/v1/execute").prepare()
    return HTTPAdapter().build_response(request, wire)


SUCCESS = {"status": "SUCCESS", "data": {"summary": "ok"}}
FAILED_RETRYABLE = {"status": "FAILED", "error": {"code": "GPU_BUSY", "message": "try later", "retryable": True}}
FAILED_PERMANENT = {"status": "FAILED", "error": {"code": "BAD_PROMPT", "message": "no", "retryable": False}}
ERROR_BODY = {"status": "FAILED", "error": {"code": "OVERLOADED", "message": "queue full"}}


@pytest.mark.parametrize(
    "response, error_class, code, retryable, retry_after_s",
    [
        # 2xx whose body says FAILED: the body decides retryability.
        (reply(200, FAILED_RETRYABLE), errors.TransientStepError, "GPU_BUSY", True, None),
        (reply(200, FAILED_PERMANENT), errors.PermanentStepError, "BAD_PROMPT", False, None),
        (reply(200, {"status": "FAILED", "error": {"message": "no code"}}), errors.PermanentStepError,
         "DOWNSTREAM_FAILED", False, None),
        (reply(200, {"status": "FAILED"}), errors.PermanentStepError, "DOWNSTREAM_FAILED", False, None),
        # 2xx that breaks the envelope: malformed, retryable.
        (reply(200, raw=b"<html>oops</html>", headers={"Content-Type": "text/html"}), errors.MalformedResponse,
         "MALFORMED_RESPONSE", True, None),
        (reply(200, raw=b'{"status": "SUCC'), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        (reply(200, raw=b""), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        (reply(200, ["SUCCESS"]), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        (reply(200, {"status": "DONE", "data": {}}), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        (reply(200, {"data": {}}), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        (reply(200, {"status": "SUCCESS", "data": ["not", "an", "object"]}), errors.MalformedResponse,
         "MALFORMED_RESPONSE", True, None),
        (reply(200, {"status": "SUCCESS", "data": {}, "metrics": 12}), errors.MalformedResponse,
         "MALFORMED_RESPONSE", True, None),
        (reply(204, raw=b""), errors.MalformedResponse, "MALFORMED_RESPONSE", True, None),
        # 429 and 503: the service is busy. Retryable, with its Retry-After in seconds.
        (reply(429, ERROR_BODY, headers={"Retry-After": "7"}), errors.ResourceExhausted, "RESOURCE_EXHAUSTED",
         True, 7.0),
        (reply(503, ERROR_BODY, headers={"Retry-After": "1.5"}), errors.ResourceExhausted, "RESOURCE_EXHAUSTED",
         True, 1.5),
        (reply(503, raw=b"busy", headers={"Content-Type": "text/plain"}), errors.ResourceExhausted,
         "RESOURCE_EXHAUSTED", True, None),
        (reply(429), errors.ResourceExhausted, "RESOURCE_EXHAUSTED", True, None),
        (reply(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}), errors.ResourceExhausted,
         "RESOURCE_EXHAUSTED", True, 0.0),  # an HTTP date already past: no wait
        (reply(429, headers={"Retry-After": "-3"}), errors.ResourceExhausted, "RESOURCE_EXHAUSTED", True, 0.0),
        # Other 5xx: the service failed. Retryable; Retry-After is not read.
        (reply(500, ERROR_BODY), errors.DownstreamServerError, "DOWNSTREAM_ERROR", True, None),
        (reply(500, ERROR_BODY, headers={"Retry-After": "9"}), errors.DownstreamServerError, "DOWNSTREAM_ERROR",
         True, None),
        (reply(502, raw=b"Bad Gateway", headers={"Content-Type": "text/plain"}), errors.DownstreamServerError,
         "DOWNSTREAM_ERROR", True, None),
        (reply(504), errors.DownstreamServerError, "DOWNSTREAM_ERROR", True, None),
        (reply(599, ERROR_BODY), errors.DownstreamServerError, "DOWNSTREAM_ERROR", True, None),
        # Other 4xx: the request is wrong. Not retryable, whatever the body says.
        (reply(400, ERROR_BODY), errors.DownstreamRejected, "DOWNSTREAM_REJECTED", False, None),
        (reply(401), errors.DownstreamRejected, "DOWNSTREAM_REJECTED", False, None),
        (reply(403, raw=b"forbidden", headers={"Content-Type": "text/plain"}), errors.DownstreamRejected,
         "DOWNSTREAM_REJECTED", False, None),
        (reply(404, ERROR_BODY), errors.DownstreamRejected, "DOWNSTREAM_REJECTED", False, None),
        (reply(422, FAILED_RETRYABLE), errors.DownstreamRejected, "DOWNSTREAM_REJECTED", False, None),
        (reply(499, headers={"Retry-After": "5"}), errors.DownstreamRejected, "DOWNSTREAM_REJECTED", False, None),
    ],
)
def test_a_failed_reply_becomes_a_typed_error(response, error_class, code, retryable, retry_after_s):
    with pytest.raises(errors.StepError) as raised:
        parse_reply(SERVICE, response, 12)

    error = raised.value
    assert type(error) is error_class
    assert (error.code, error.retryable, error.retry_after_s) == (code, retryable, retry_after_s)
    assert error.status_code == response.status_code
    assert SERVICE in error.message


@pytest.mark.parametrize("status", [200, 201, 202, 299])
def test_a_2xx_success_returns_the_output_with_the_measured_latency(status):
    result = parse_reply(SERVICE, reply(status, SUCCESS), 12)

    assert result == ServiceReply(
        data={"summary": "ok"}, metrics={"execution_time_ms": 12, "gateway_latency_ms": 12}, status_code=status
    )


def test_the_services_own_metrics_are_kept_and_the_gateway_latency_is_added():
    body = {"status": "SUCCESS", "data": {"a": 1}, "metrics": {"execution_time_ms": 7, "tokens": 40}}

    result = parse_reply(SERVICE, reply(200, body), 12)

    assert result.metrics == {"execution_time_ms": 7, "tokens": 40, "gateway_latency_ms": 12}


@pytest.mark.parametrize(
    "body, data, metrics",
    [
        ({"status": "SUCCESS"}, {}, {"execution_time_ms": 5, "gateway_latency_ms": 5}),
        ({"status": "SUCCESS", "data": {}, "metrics": None}, {}, {"execution_time_ms": 5, "gateway_latency_ms": 5}),
    ],
)
def test_data_and_metrics_are_optional_in_a_success(body, data, metrics):
    result = parse_reply(SERVICE, reply(200, body), 5)

    assert (result.data, result.metrics) == (data, metrics)


@pytest.mark.parametrize("status", [300, 302, 307, 399])
def test_only_a_2xx_can_succeed(status):
    # Redirects are not followed (allow_redirects=False): a SUCCESS body outside 2xx is not an output.
    with pytest.raises(errors.StepError):
        parse_reply(SERVICE, reply(status, SUCCESS), 1)


@pytest.mark.parametrize(
    "response, reported",
    [
        (reply(500, ERROR_BODY), ("OVERLOADED", "queue full")),
        (reply(503, ERROR_BODY), ("OVERLOADED", "queue full")),
        (reply(404, ERROR_BODY), ("OVERLOADED", "queue full")),
        (reply(200, FAILED_RETRYABLE), ("try later",)),
    ],
)
def test_the_services_own_error_detail_reaches_the_error_message(response, reported):
    # What ops read in the job's error_message; the wording around it is not part of the contract.
    with pytest.raises(errors.StepError) as raised:
        parse_reply(SERVICE, response, 1)

    assert all(text in raised.value.message for text in reported), raised.value.message


@pytest.mark.parametrize(
    "response",
    [
        reply(503),
        reply(500, raw=b"oops", headers={"Content-Type": "text/plain"}),
        reply(503, {"status": "FAILED", "error": {"code": "BUSY"}}),  # a code, no message
        reply(502, {"status": "FAILED", "error": {"message": "upstream died"}}),  # a message, no code
        reply(200, {"status": "FAILED"}),
        reply(200, {"status": "FAILED", "error": {"code": "BUSY"}}),
    ],
)
def test_a_reply_without_error_detail_writes_no_none_in_the_message(response):
    with pytest.raises(errors.StepError) as raised:
        parse_reply(SERVICE, response, 1)

    assert "None" not in raised.value.message


def test_a_reported_error_code_is_cut_to_fit_the_jobs_error_code_column():
    from jobs.models import Job

    column = Job._meta.get_field("error_code").max_length
    body = {"status": "FAILED", "error": {"code": "E" * 100, "retryable": True}}

    with pytest.raises(errors.TransientStepError) as raised:
        parse_reply(SERVICE, reply(200, body), 1)

    assert raised.value.code == "E" * column


@pytest.mark.parametrize(
    "headers, seconds",
    [
        ({"Retry-After": "20"}, 20.0),
        ({"Retry-After": "20", "x-ratelimit-reset-requests": "5m"}, 20.0),  # Retry-After wins
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),  # the longest
        ({"x-ratelimit-reset-tokens": "250ms"}, 0.25),
        ({"x-ratelimit-reset": "1h2m3.5s"}, 3723.5),
        ({"x-ratelimit-reset-requests": "12"}, 12.0),  # a bare number is seconds
        ({"x-ratelimit-reset-requests": "soon"}, None),
        ({"x-ratelimit-reset-requests": "5 minutes"}, None),
        ({"Retry-After": "not a date"}, None),
        ({}, None),
    ],
)
def test_the_wait_a_busy_service_asks_for_is_read_from_its_headers(headers, seconds):
    with pytest.raises(errors.ResourceExhausted) as raised:
        parse_reply(SERVICE, reply(429, ERROR_BODY, headers=headers), 12)

    assert raised.value.retry_after_s == seconds


def test_a_retry_after_date_counts_from_now():
    when = email.utils.format_datetime(datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=90))

    with pytest.raises(errors.ResourceExhausted) as raised:
        parse_reply(SERVICE, reply(503, headers={"Retry-After": when}), 12)

    assert 80 < raised.value.retry_after_s <= 90
