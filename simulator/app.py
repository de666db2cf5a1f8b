"""The simulator as a plain ASGI application.

Routes:
- ``POST /{service}{execute_path}``: a step call (auth, envelope, then knobs)
- ``GET /{service}/health``: a health check
- ``/_sim/...``: the control API (health, stats, reset, config, requests)

Every sleep (latency, hang) races the client's disconnect and the server's
shutdown: a client that gave up stops counting as in flight, and stopping the
server never waits for an hour-long hang.
"""

import asyncio
import json
import logging
import random
import re
import time
from urllib.parse import parse_qs

from simulator.decisions import decide_execute, decide_health
from simulator.envelope import envelope_validate, request_authorize
from simulator.errors import (
    BadControlRequest,
    KnobError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    RequestRejected,
)
from simulator.knobs import parse_changes
from simulator.replies import failure_body, injected_failure_body, malformed_body, success_body

logger = logging.getLogger(__name__)

EXECUTE_PATH = "/v1/execute"
CONTROL_PREFIX = "/_sim"
MAX_BODY_BYTES = 8 * 1024 * 1024
DISCONNECTED = "disconnected"
_WOKE, _CLOSING = "woke", "closing"
_SLASHES = re.compile(r"/{2,}")


class _ClientGone(Exception):
    """Raised when the client disconnects before its request body arrived."""


def _headers(scope):
    """Request headers as ``{lower-case name: value}``; repeated headers are joined with ", "."""
    headers = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _query(scope):
    return {name: values[-1] for name, values in parse_qs(scope["query_string"].decode("latin-1")).items()}


async def _send_bytes(send, status, body, *, content_type=b"application/json", extra_headers=()):
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _send_json(send, status, payload, *, extra_headers=()):
    await _send_bytes(send, status, json.dumps(payload).encode(), extra_headers=extra_headers)


async def _read_body(receive, limit=MAX_BODY_BYTES):
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"The body exceeds {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _sent_credential(headers, api_key_header):
    """The credential the caller sent (bearer token or key header), or None."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get(api_key_header.lower())


async def _wait_disconnect(receive):
    while (await receive())["type"] != "http.disconnect":
        pass


class SimulatorApp:
    """ASGI app serving every simulated service under ``/{service}`` and the control API under ``/_sim``."""

    def __init__(
        self,
        state,
        *,
        api_key=None,
        api_key_header="X-API-Key",
        execute_path=EXECUTE_PATH,
        rng=None,
        clock=time.perf_counter,
    ):
        self.state = state
        self.api_key = api_key
        self.api_key_header = api_key_header
        self.execute_path = execute_path
        self._rng = rng or random.Random()
        self._clock = clock
        self._closing = asyncio.Event()

    def close(self):
        """End every pending sleep now (call from the server's event loop): the server is stopping."""
        self._closing.set()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            try:
                await self._route(scope, receive, send)
            except _ClientGone:
                pass
            except RequestRejected as exc:
                await _send_json(send, exc.status_code, failure_body(exc.code, exc.message, retryable=exc.retryable))

    async def _lifespan(self, receive, send):
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope, receive, send):
        path, method = scope["path"], scope["method"]
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            await self._control(scope, receive, send)
            return
        service, _, rest = path.lstrip("/").partition("/")
        if service not in self.state.stats:
            raise NotFound(f"No simulated service named {service!r}; known: {', '.join(self.state.services)}.")
        # Tolerate a base URL with a trailing slash ("/svc//v1/execute").
        rest = _SLASHES.sub("/", "/" + rest)
        if rest == self.execute_path:
            if method != "POST":
                raise MethodNotAllowed(f"{rest} takes POST.")
            await self._execute(service, scope, receive, send)
        elif rest == "/health":
            if method not in ("GET", "HEAD"):
                raise MethodNotAllowed("/health takes GET.")
            await self._health(service, scope, receive, send)
        else:
            raise NotFound(f"{service} has no {rest}; use POST {self.execute_path} or GET /health.")

    async def _pause(self, seconds, receive):
        """Sleep unless the client leaves or the server stops first; says which happened."""
        if self._closing.is_set():
            return _CLOSING
        if seconds <= 0:
            return _WOKE
        waits = {
            asyncio.ensure_future(asyncio.sleep(seconds)): _WOKE,
            asyncio.ensure_future(_wait_disconnect(receive)): DISCONNECTED,
            asyncio.ensure_future(self._closing.wait()): _CLOSING,
        }
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        outcomes = {waits[task] for task in done}
        return next(outcome for outcome in (DISCONNECTED, _CLOSING, _WOKE) if outcome in outcomes)

    def _record(self, service, kind, scope, headers, body):
        return self.state.request_record(
            service,
            kind=kind,
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"].decode("latin-1"),
            headers=headers,
            body=body,
        )

    async def _execute(self, service, scope, receive, send):
        started = self._clock()
        self.state.call_started(service)
        outcome, entry = 500, None
        try:
            body = await _read_body(receive)
            headers = _headers(scope)
            entry = self._record(service, "execute", scope, headers, body)
            request_authorize(headers=headers, api_key=self.api_key, api_key_header=self.api_key_header)
            envelope = envelope_validate(body=body, headers=headers, service=service)
            key = headers["idempotency-key"]
            plan = decide_execute(self.state.config[service], self.state.call_counted(service, key), rng=self._rng)
            woke = await self._pause(plan.delay_s, receive)
            if woke == DISCONNECTED:
                outcome = DISCONNECTED
            elif woke == _CLOSING:
                outcome = 503
                await _send_json(
                    send, 503, failure_body("SHUTTING_DOWN", f"{service} is shutting down.", retryable=True)
                )
            elif plan.status != 200:
                outcome = plan.status
                body = injected_failure_body(service, plan.status, retryable=plan.retryable)
                retry_after = () if plan.retry_after_s is None else ((b"retry-after", f"{plan.retry_after_s:g}".encode()),)
                await _send_json(send, plan.status, body, extra_headers=retry_after)
            elif plan.malformed:
                outcome = 200
                secret = _sent_credential(headers, self.api_key_header)
                await _send_bytes(send, 200, malformed_body(plan.malformed, service, secret=secret))
            else:
                outcome = 200
                elapsed_ms = int((self._clock() - started) * 1000)
                await _send_json(send, 200, success_body(service, envelope, key=key, execution_time_ms=elapsed_ms))
        except _ClientGone:
            outcome = DISCONNECTED
        except RequestRejected as exc:
            outcome = exc.status_code
            await _send_json(send, exc.status_code, failure_body(exc.code, exc.message, retryable=exc.retryable))
        finally:
            self.state.call_finished(service, outcome, entry)

    async def _health(self, service, scope, receive, send):
        entry = self._record(service, "health", scope, _headers(scope), b"")
        plan = decide_health(self.state.config[service])
        woke = await self._pause(plan.delay_s, receive)
        if woke == DISCONNECTED:
            self.state.health_checked(service, DISCONNECTED, entry)
            return
        status = 503 if woke == _CLOSING else plan.status
        self.state.health_checked(service, status, entry)
        body = {"ok": status == 200, "service": service}
        if status != 200:
            body["error"] = {"code": "UNHEALTHY", "message": f"{service} reports itself unhealthy (simulated)."}
        await _send_json(send, status, body)

    # --- Control API ----------------------------------------------------------

    async def _control(self, scope, receive, send):
        route = scope["path"][len(CONTROL_PREFIX):].rstrip("/") or "/"
        handlers = {
            "/health": {"GET": self._control_health},
            "/stats": {"GET": self._control_stats},
            "/reset": {"POST": self._control_reset},
            "/config": {"GET": self._control_config_get, "POST": self._control_config_post},
            "/requests": {"GET": self._control_requests},
        }
        if route not in handlers:
            known = ", ".join(CONTROL_PREFIX + name for name in handlers)
            raise NotFound(f"No control endpoint {scope['path']}; try {known}.")
        handler = handlers[route].get(scope["method"])
        if handler is None:
            raise MethodNotAllowed(f"{scope['path']} takes {', '.join(handlers[route])}.")
        body = await _read_body(receive)
        status, payload = handler(_query(scope), body)
        await _send_json(send, status, payload)

    def _json_body(self, body):
        if not body.strip():
            return {}
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            raise BadControlRequest("The body is not valid JSON.") from None
        if not isinstance(data, dict):
            raise BadControlRequest("The body must be a JSON object.")
        return data

    def _service_param(self, query):
        service = query.get("service") or None
        if service is not None and service not in self.state.stats:
            raise NotFound(f"No simulated service named {service!r}.")
        return service

    def _control_health(self, query, body):
        return 200, {"ok": True, "services": list(self.state.services)}

    def _control_stats(self, query, body):
        keys = query.get("keys", "1").lower() not in ("0", "false", "no")
        return 200, self.state.stats_json(service=self._service_param(query), keys=keys)

    def _control_reset(self, query, body):
        config = self._json_body(body).get("config", False)
        if not isinstance(config, bool):
            raise BadControlRequest("'config' must be true or false.")
        self.state.reset(config=config)
        return 200, {"ok": True, "config": self.state.config_json()}

    def _control_config_get(self, query, body):
        return 200, self.state.config_json()

    def _control_config_post(self, query, body):
        try:
            changes = parse_changes(self._json_body(body), self.state.services)
        except KnobError as exc:
            raise BadControlRequest(str(exc)) from None
        self.state.config_update(changes)
        logger.info("Simulator knobs changed: %s", self.state.config_json())
        return 200, self.state.config_json()

    def _control_requests(self, query, body):
        limit = query.get("limit")
        if limit is not None and not (limit.isdigit() and int(limit) > 0):
            raise BadControlRequest("'limit' must be a positive integer.")
        entries = self.state.requests_recent(
            service=self._service_param(query), kind=query.get("kind") or None, limit=int(limit) if limit else None
        )
        return 200, entries
