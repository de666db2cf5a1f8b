"""The only place that talks HTTP to downstream services.

One small class: mandatory timeouts, no hidden retries (the engine owns
retries), one ``requests.Session`` per thread so connections are reused, and
every non-success reply turned into a typed ``StepError``.
"""

import json
import threading
import time
from dataclasses import dataclass

import requests
from django.conf import settings

from common.logs import redact
from orchestration import errors
from services_registry.health import describe_request_error as _reason

MAX_ERROR_TEXT = 500


@dataclass(frozen=True)
class ServiceReply:
    """A successful step output."""

    data: dict
    metrics: dict
    status_code: int


def auth_headers(service):
    """The header that carries INTERNAL_API_KEY for ``service``, if any."""
    key = settings.INTERNAL_API_KEY
    if not key or service.auth_type == "none":
        return {}
    if service.auth_type == "bearer":
        return {"Authorization": f"Bearer {key}"}
    return {service.auth_header_name: key}


class ServiceClient:
    """POSTs step envelopes to services; thread-safe."""

    def __init__(self, *, session_factory=requests.Session, clock=time.perf_counter):
        self._session_factory = session_factory
        self._clock = clock
        self._local = threading.local()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._session_factory()
            session.trust_env = settings.CAO_HTTP_TRUST_ENV
            session.headers["User-Agent"] = "cao-gateway/1.0"
            self._local.session = session
        return session

    def execute(self, service, *, envelope, idempotency_key):
        """Call the service once; return its ServiceReply or raise a StepError."""
        timeout = (settings.HTTP_CONNECT_TIMEOUT_S, min(service.timeout_s, settings.HTTP_READ_TIMEOUT_S))
        headers = {"Idempotency-Key": idempotency_key, **auth_headers(service)}
        started = self._clock()
        try:
            response = self._session().post(
                service.execute_url, json=envelope, headers=headers, timeout=timeout, allow_redirects=False
            )
        except requests.Timeout:
            raise errors.DownstreamTimeout(
                f"{service.name} did not answer within {timeout[1]:g} s."
            ) from None
        except requests.ConnectionError as exc:
            raise errors.DownstreamUnreachable(f"{service.name} is unreachable: {redact(_reason(exc))}") from None
        except requests.RequestException as exc:
            raise errors.DownstreamUnreachable(f"{service.name} call failed: {redact(_reason(exc))}") from None
        elapsed_ms = int((self._clock() - started) * 1000)
        return parse_reply(service.name, response, elapsed_ms)


def parse_reply(service_name, response, elapsed_ms):
    """Turn an HTTP response into a ServiceReply or a typed StepError."""
    status = response.status_code
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        body = None
    if 200 <= status < 300:
        return _success(service_name, status, body, elapsed_ms)
    code, message = _error_detail(body)
    text = f"{service_name} answered {status}" + (f" ({code})" if code else "") + (f": {message}" if message else ".")
    if status in (429, 503):
        raise errors.ResourceExhausted(text, status_code=status, retry_after_s=_retry_after(response))
    if status >= 500:
        raise errors.DownstreamServerError(text, status_code=status)
    raise errors.DownstreamRejected(text, status_code=status)


def _success(service_name, status, body, elapsed_ms):
    if not isinstance(body, dict):
        raise errors.MalformedResponse(f"{service_name} answered {status} without a JSON object.", status_code=status)
    outcome = body.get("status")
    if outcome == "SUCCESS":
        data = body.get("data", {})
        metrics = body.get("metrics") or {}
        if not isinstance(data, dict) or not isinstance(metrics, dict):
            raise errors.MalformedResponse(
                f"{service_name} answered SUCCESS but 'data' and 'metrics' must be objects.", status_code=status
            )
        metrics = {"execution_time_ms": elapsed_ms, **metrics, "gateway_latency_ms": elapsed_ms}
        return ServiceReply(data=data, metrics=metrics, status_code=status)
    if outcome == "FAILED":
        error = body.get("error") if isinstance(body.get("error"), dict) else {}
        code, message = _error_detail(body)
        raise errors.reported_failure(
            code,
            f"{service_name} reported a failure" + (f": {message}" if message else "."),
            retryable=bool(error.get("retryable", False)),
            status_code=status,
        )
    raise errors.MalformedResponse(
        f"{service_name} answered {status} with status {str(outcome)[:40]!r}; expected SUCCESS or FAILED.",
        status_code=status,
    )


def _error_detail(body):
    """(code, message) from a ``{"error": {...}}`` body, truncated; (None, None) if absent."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None, None
    error = body["error"]
    code = error.get("code")
    message = error.get("message")
    code = redact(str(code)[:64]) if code else None
    message = redact(str(message)[:MAX_ERROR_TEXT]) if message else None
    return code, message


def _retry_after(response):
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None  # HTTP-date form: fall back to the engine's backoff
