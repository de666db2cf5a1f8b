"""The downstream request contract, checked the way a strict service would.

Envelope: ``{"meta": {job_id, step_index, service_name, attempt, timestamp},
"payload": {"params": {...}, "context": {...}}}`` with the header
``Idempotency-Key: {job_id}:{step_index}:{service_name}``.
"""

import hmac
import json

from simulator.errors import BadEnvelope, Unauthorized


def request_authorize(*, headers, api_key, api_key_header):
    """Raise Unauthorized unless ``headers`` (lower-case names) carry ``api_key``; no key, no check."""
    if not api_key:
        return
    expected = api_key.encode()
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected):
        return
    given = headers.get(api_key_header.lower())
    if given is not None and hmac.compare_digest(given.encode(), expected):
        return
    raise Unauthorized(f"Missing or wrong API key: send 'Authorization: Bearer <key>' or '{api_key_header}: <key>'.")


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_problems(meta, service):
    problems = []
    job_id = meta.get("job_id")
    if not isinstance(job_id, str) or not job_id.strip():
        problems.append("meta.job_id must be a non-empty string")
    if not _is_int(meta.get("step_index")) or meta["step_index"] < 0:
        problems.append("meta.step_index must be an integer >= 0")
    if "service_name" not in meta:
        problems.append("meta.service_name is missing")
    elif meta["service_name"] != service:
        problems.append(f"meta.service_name is {meta['service_name']!r} but this is {service!r}")
    if not _is_int(meta.get("attempt")) or meta["attempt"] < 1:
        problems.append("meta.attempt must be an integer >= 1")
    timestamp = meta.get("timestamp")
    if isinstance(timestamp, bool) or not isinstance(timestamp, str | int | float) or timestamp == "":
        problems.append("meta.timestamp must be a non-empty string or a number")
    return problems


def _payload_problems(payload):
    problems = []
    for name in ("params", "context"):
        if not isinstance(payload.get(name), dict):
            problems.append(f"payload.{name} must be an object")
    return problems


def envelope_validate(*, body, headers, service):
    """The parsed envelope of a call to ``service``; raises BadEnvelope listing every problem."""
    try:
        envelope = json.loads(body)
    except (UnicodeDecodeError, ValueError):
        raise BadEnvelope("The body is not valid JSON.") from None
    if not isinstance(envelope, dict):
        raise BadEnvelope("The body must be a JSON object with 'meta' and 'payload'.")
    problems = []
    meta, payload = envelope.get("meta"), envelope.get("payload")
    if isinstance(meta, dict):
        problems += _meta_problems(meta, service)
    else:
        problems.append("meta must be an object")
    if isinstance(payload, dict):
        problems += _payload_problems(payload)
    else:
        problems.append("payload must be an object")
    key = headers.get("idempotency-key")
    if key is None:
        problems.append("the Idempotency-Key header is missing")
    elif isinstance(meta, dict) and not problems:
        expected = f"{meta['job_id']}:{meta['step_index']}:{meta['service_name']}"
        if key != expected:
            problems.append(f"Idempotency-Key is {key!r}, expected {expected!r}")
    if problems:
        raise BadEnvelope("Bad envelope: " + "; ".join(problems) + ".")
    return envelope
