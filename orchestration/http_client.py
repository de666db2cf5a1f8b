"""The only place that talks HTTP to downstream services.

One small class: mandatory timeouts, no hidden retries (the engine owns
retries), connections reused (one ``requests.Session`` per thread; one per
process in a green worker, whose greenlets would otherwise each open their
own), and every non-success reply turned into a typed ``StepError``.

A service is trusted with nothing: its reply is read up to
CAO_MAX_REPLY_BYTES, parsed as strict JSON, refused when the database could
not store it (NaN, Infinity, NUL, lone surrogates, nesting deeper than
CAO_MAX_REPLY_DEPTH), and every string kept from it is masked of
INTERNAL_API_KEY, which a hostile or buggy service might echo back.
"""

import datetime
import email.utils
import re
import threading
import time
from dataclasses import dataclass

import requests
import requests.adapters
from django.conf import settings
from urllib3.exceptions import ReadTimeoutError

from common import green, json_values
from common.logs import redact
from orchestration import errors
from services_registry.health import describe_request_error as _reason

MAX_ERROR_TEXT = 500
MAX_CODE_TEXT = 64
READ_CHUNK_BYTES = 64 * 1024


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
        # Greenlets switch only while waiting on a socket, and urllib3's pool
        # is safe to share: one session lets every greenlet reuse the
        # connections of the others instead of opening one per greenlet.
        holder = self if green.active() else self._local
        session = getattr(holder, "session", None)
        if session is None:
            session = self._new_session()
            holder.session = session
        return session

    def _new_session(self):
        session = self._session_factory()
        session.trust_env = settings.CAO_HTTP_TRUST_ENV
        session.headers["User-Agent"] = "cao-gateway/1.0"
        if green.active():
            size = settings.CAO_HTTP_POOL_SIZE
            for prefix in ("http://", "https://"):
                session.mount(prefix, requests.adapters.HTTPAdapter(pool_connections=size, pool_maxsize=size))
        return session

    def execute(self, service, *, envelope, idempotency_key, timeout_s=None):
        """Call the service once; return its ServiceReply or raise a StepError.

        ``timeout_s``: the most the whole call may take when that is less
        than the service's timeout (a job's time left before its deadline).
        """
        connect_s, read_s = settings.HTTP_CONNECT_TIMEOUT_S, service.effective_timeout_s
        whole_s = connect_s + read_s
        if timeout_s is not None:
            connect_s, read_s, whole_s = min(connect_s, timeout_s), min(read_s, timeout_s), min(whole_s, timeout_s)
        timeout = (connect_s, read_s)
        headers = {"Idempotency-Key": idempotency_key, **auth_headers(service)}
        started = self._clock()
        try:
            response = self._session().post(
                service.execute_url, json=envelope, headers=headers, timeout=timeout, allow_redirects=False,
                stream=True,
            )
            with response:
                # The read timeout bounds each wait for bytes; the deadline
                # bounds the whole reply, so a trickle cannot hold the slot.
                deadline = started + whole_s
                body = _read_limited(service.name, response, settings.CAO_MAX_REPLY_BYTES, deadline, self._clock)
        except requests.Timeout:
            raise errors.DownstreamTimeout(
                f"{service.name} did not answer within {timeout[1]:g} s."
            ) from None
        except requests.ConnectionError as exc:
            raise errors.DownstreamUnreachable(f"{service.name} is unreachable: {redact(_reason(exc))}") from None
        except requests.RequestException as exc:
            raise errors.DownstreamUnreachable(f"{service.name} call failed: {redact(_reason(exc))}") from None
        elapsed_ms = int((self._clock() - started) * 1000)
        return parse_reply(service.name, response, elapsed_ms, body=body)


def _read_limited(service_name, response, limit, deadline, clock):
    """The reply body; MalformedResponse past ``limit`` bytes, DownstreamTimeout past ``deadline``."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(service_name, response.status_code, limit)
    chunks, size = [], 0
    try:
        for chunk in response.iter_content(READ_CHUNK_BYTES):
            size += len(chunk)
            if size > limit:
                raise _too_large(service_name, response.status_code, limit)
            if clock() > deadline:
                raise requests.Timeout()
            chunks.append(chunk)
    except requests.ConnectionError as exc:
        # requests reports a read timeout while streaming a body as a
        # ConnectionError wrapping urllib3's ReadTimeoutError.
        if exc.args and isinstance(exc.args[0], ReadTimeoutError):
            raise requests.Timeout() from None
        raise
    return b"".join(chunks)


def _too_large(service_name, status, limit):
    return errors.MalformedResponse(
        f"{service_name} answered {status} with more than {limit} bytes (CAO_MAX_REPLY_BYTES).", status_code=status
    )


def parse_reply(service_name, response, elapsed_ms, *, body=None):
    """Turn an HTTP response into a ServiceReply or a typed StepError.

    ``body``: the raw bytes already read (default: ``response.content``).
    """
    status = response.status_code
    raw = response.content if body is None else body
    problem = None
    try:
        parsed = json_values.loads(raw) if raw else None
    except json_values.InvalidJSON as exc:
        parsed, problem = None, str(exc)
    if 200 <= status < 300:
        return _success(service_name, status, parsed, elapsed_ms, problem)
    code, message = _error_detail(parsed)
    text = f"{service_name} answered {status}" + (f" ({code})" if code else "") + (f": {message}" if message else ".")
    if status in (429, 503):
        raise errors.ResourceExhausted(text, status_code=status, retry_after_s=_retry_after(response))
    if status >= 500:
        raise errors.DownstreamServerError(text, status_code=status)
    raise errors.DownstreamRejected(text, status_code=status)


def _success(service_name, status, body, elapsed_ms, problem=None):
    if not isinstance(body, dict):
        detail = f": {problem}" if problem else ""
        raise errors.MalformedResponse(
            f"{service_name} answered {status} without a JSON object{detail}.", status_code=status
        )
    outcome = body.get("status")
    if outcome == "SUCCESS":
        data = body.get("data", {})
        metrics = body.get("metrics") or {}
        if not isinstance(data, dict) or not isinstance(metrics, dict):
            raise errors.MalformedResponse(
                f"{service_name} answered SUCCESS but 'data' and 'metrics' must be objects.", status_code=status
            )
        reason = json_values.unstorable_reason(
            {"data": data, "metrics": metrics}, max_depth=settings.CAO_MAX_REPLY_DEPTH
        )
        if reason:
            raise errors.MalformedResponse(
                f"{service_name} answered SUCCESS with output that cannot be stored: {reason}.", status_code=status
            )
        metrics = {"execution_time_ms": elapsed_ms, **metrics, "gateway_latency_ms": elapsed_ms}
        return ServiceReply(data=mask_secrets(data), metrics=mask_secrets(metrics), status_code=status)
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
        f"{service_name} answered {status} with status {_kept_text(outcome, 40)!r}; expected SUCCESS or FAILED.",
        status_code=status,
    )


def _error_detail(body):
    """(code, message) from a ``{"error": {...}}`` body, masked then truncated; (None, None) if absent."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return None, None
    error = body["error"]
    code = error.get("code")
    message = error.get("message")
    code = _kept_text(code, MAX_CODE_TEXT) if code else None
    message = _kept_text(message, MAX_ERROR_TEXT) if message else None
    return code, message


def _kept_text(value, limit):
    """A downstream value as text the gateway may keep: masked first, then cut to ``limit``.

    Masking after cutting would let a prefix of a secret survive the cut.
    """
    text = str(value)
    if json_values.unstorable_reason(text, max_depth=1):
        text = text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "")
    return redact(text)[:limit]


def mask_secrets(value):
    """``value`` with INTERNAL_API_KEY (and API keys) masked in every string and key."""
    if isinstance(value, dict):
        return {mask_secrets(key): mask_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    if isinstance(value, str):
        return redact(value)
    return value


# "1s", "6m0s", "250ms", "1h2m3.5s": how AI providers write x-ratelimit-reset-* (a bare number is seconds).
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _retry_after(response):
    """Seconds the service asked callers to wait, or None.

    ``Retry-After`` (seconds, or an HTTP date), else the longest of the
    ``x-ratelimit-reset-*`` headers providers send with a 429 (e.g.
    ``x-ratelimit-reset-requests: 1s``, ``x-ratelimit-reset-tokens: 6m0s``).
    """
    value = response.headers.get("Retry-After", "").strip()
    if value:
        return _seconds_or_date(value)
    resets = [
        _duration_s(header_value.strip())
        for name, header_value in response.headers.items()
        if name.lower().startswith("x-ratelimit-reset")
    ]
    resets = [seconds for seconds in resets if seconds is not None]
    return max(resets) if resets else None


def _seconds_or_date(value):
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


def _duration_s(value):
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)
