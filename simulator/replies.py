"""Reply bodies: deterministic, plausible outputs of each simulated service.

Outputs depend only on the envelope (never on the clock), so a retried call
returns the same data. Later steps build on earlier ones through
``payload.context``: the chat model drafts from the enhanced prompt, the
summarizer condenses the draft, the video and the email reuse what came before.
"""

import hashlib
import json
import re

# Keys of params that may hold the user's request, in order of preference.
_PROMPT_KEYS = ("prompt", "topic", "idea", "text", "query", "description", "input")
_STEP_KEY = re.compile(r"step_(\d+)_")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

# Failure status -> machine code of the body.
_STATUS_CODES = {
    400: "INVALID_INPUT",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    408: "REQUEST_TIMEOUT",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    422: "UNPROCESSABLE",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL_ERROR",
    502: "BAD_GATEWAY",
    503: "SERVICE_UNAVAILABLE",
    504: "GATEWAY_TIMEOUT",
}


def failure_body(code, message, *, retryable):
    return {"status": "FAILED", "error": {"code": code, "message": message, "retryable": retryable}}


def injected_failure_body(service, status, *, retryable):
    """The body of a failure asked for by the ``fail`` knob."""
    code = _STATUS_CODES.get(status, "CLIENT_ERROR" if status < 500 else "SERVER_ERROR")
    return failure_body(code, f"{service} failed on purpose with {status} (simulated).", retryable=retryable)


# Replies a database cannot store or a gateway must not keep, as a hostile
# or buggy service might send them (knobs.MALFORMED_KINDS).
_HOSTILE = {
    "nan": b'{"status": "SUCCESS", "data": {"x": NaN}}',
    "infinity": b'{"status": "SUCCESS", "data": {"x": Infinity, "y": 1e999}}',
    "nul": b'{"status": "SUCCESS", "data": {"text": "nul\\u0000byte"}}',
    "surrogate": b'{"status": "SUCCESS", "data": {"text": "\\ud800"}}',
    "deep": b'{"status": "SUCCESS", "data": {"x": ' + b"[" * 2000 + b"]" * 2000 + b"}}",
}


def malformed_body(kind, service, *, secret=None):
    """Bytes of a broken 200 reply of ``kind`` (see knobs.MALFORMED_KINDS).

    The ``echo_secret*`` kinds repeat ``secret`` (the credential the gateway
    sent) in the status and error, in a reported failure, or in the output,
    as a hostile service would.
    """
    if kind == "nostatus":
        return json.dumps({"data": {"note": f"{service} forgot the status field (simulated)"}}).encode()
    if kind == "empty":
        return b""
    if kind == "oversized":
        return json.dumps({"status": "SUCCESS", "data": {"blob": "x" * (9 * 1024 * 1024)}}).encode()
    secret = secret or ""
    if kind == "echo_secret":
        return json.dumps({"status": secret, "error": {"code": secret, "message": secret}}).encode()
    if kind == "echo_secret_failed":
        error = {"code": f"E{secret}", "message": f"bad key {secret}", "retryable": False}
        return json.dumps({"status": "FAILED", "error": error}).encode()
    if kind == "echo_secret_data":
        return json.dumps({"status": "SUCCESS", "data": {"echo_header": secret, secret: "as a key"}}).encode()
    if kind in _HOSTILE:
        return _HOSTILE[kind]
    return b'{"status": "SUCCESS", "data": {"truncated'


def _digest(*parts):
    return hashlib.sha256(":".join(str(part) for part in parts).encode()).hexdigest()


def _words(text):
    return len(text.split())


def _prompt(params):
    for key in _PROMPT_KEYS:
        value = params.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    strings = [value.strip() for value in params.values() if isinstance(value, str) and value.strip()]
    return strings[0] if strings else "an untitled request"


def _latest(context, field):
    """``field`` from the data of the latest earlier step that produced it, or None."""
    found = []
    for key, output in context.items():
        data = output.get("data") if isinstance(output, dict) else None
        if isinstance(data, dict) and isinstance(data.get(field), str):
            match = _STEP_KEY.match(key)
            found.append((int(match[1]) if match else -1, data[field]))
    return max(found)[1] if found else None


def _enhance(params, context):
    prompt = _prompt(params)
    return {
        "enhanced_prompt": (
            f"{prompt}. Be specific: name the audience, the goal and the constraints, "
            "and answer in clear sections with concrete next steps."
        ),
        "original_prompt": prompt,
    }


def _chat(params, context):
    subject = _latest(context, "enhanced_prompt") or _prompt(params)
    topic = _prompt(params)
    text = (
        f"Draft for: {topic}. "
        f"Overview: this plan answers the request '{subject[:200]}'. "
        "Market: identify the first customers and what they pay for today. "
        "Product: ship the smallest useful version and measure its use weekly. "
        "Operations: keep costs variable until demand is proven. "
        "Next steps: interview ten customers, build a prototype, review in a month."
    )
    return {"text": text, "model": "sim-fast-chat-1", "finish_reason": "stop"}


def _summarize(params, context):
    source = _latest(context, "text") or _latest(context, "enhanced_prompt") or _prompt(params)
    sentences = _SENTENCE_END.split(source.strip())
    return {"summary": " ".join(sentences[:2]), "source_words": _words(source)}


def _video(params, context, *, key):
    digest = _digest("video", key, _latest(context, "enhanced_prompt") or _prompt(params))
    return {
        "video_url": f"https://videos.simulator.invalid/{digest[:24]}.mp4",
        "thumbnail_url": f"https://videos.simulator.invalid/{digest[:24]}.jpg",
        "duration_s": 15 + int(digest[:4], 16) % 46,
    }


def _email(params, context, *, key):
    recipient = params.get("email") or params.get("recipient") or params.get("to") or "user@example.com"
    body = _latest(context, "summary") or _latest(context, "video_url") or _latest(context, "text") or _prompt(params)
    return {
        "sent": True,
        "message_id": f"<{_digest('email', key)[:32]}@simulator.invalid>",
        "recipient": str(recipient),
        "subject": f"Your result: {_prompt(params)[:60]}",
        "preview": body[:120],
    }


def success_data(service, envelope, *, key):
    """The ``data`` object ``service`` answers to ``envelope`` (Idempotency-Key ``key``)."""
    params = envelope["payload"]["params"]
    context = envelope["payload"]["context"]
    if service == "prompt_enhancer":
        return _enhance(params, context)
    if service == "fast_chat_llm":
        return _chat(params, context)
    if service == "summarizer_pro":
        return _summarize(params, context)
    if service == "video_gen_v2":
        return _video(params, context, key=key)
    if service == "email_notifier":
        return _email(params, context, key=key)
    return {"result": f"{service} processed: {_prompt(params)[:200]}", "echo": params}


def success_body(service, envelope, *, key, execution_time_ms):
    data = success_data(service, envelope, key=key)
    request_text = json.dumps(envelope["payload"], sort_keys=True, default=str)
    metrics = {
        "execution_time_ms": execution_time_ms,
        "input_tokens": _words(request_text),
        "output_tokens": _words(json.dumps(data)),
        "simulated": True,
    }
    return {"status": "SUCCESS", "data": data, "metrics": metrics}
