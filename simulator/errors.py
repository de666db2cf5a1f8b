"""Errors of the service simulator.

A rejected downstream request carries its HTTP meaning as class attributes
(status, code, retryable); the app renders every one as the failure body of
the downstream contract: ``{"status": "FAILED", "error": {code, message, retryable}}``.
"""


class SimulatorError(Exception):
    """Base class of every error raised by the simulator."""


class KnobError(SimulatorError, ValueError):
    """Raised when a knob (latency, fail, hang, ...) cannot be parsed or names an unknown service."""


class ControlError(SimulatorError):
    """Raised by the testing helpers when the control API refuses a request or the simulator will not start."""


class RequestRejected(SimulatorError):
    """Base class of the errors answered to a request before any knob applies."""

    status_code = 400
    code = "BAD_REQUEST"
    retryable = False

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class BadEnvelope(RequestRejected):
    """Raised when a request breaks the envelope contract (body, meta, payload or Idempotency-Key)."""

    code = "BAD_ENVELOPE"


class Unauthorized(RequestRejected):
    """Raised when the simulator has an API key and the request does not carry it."""

    status_code = 401
    code = "UNAUTHORIZED"


class NotFound(RequestRejected):
    """Raised when no service or control endpoint matches the path."""

    status_code = 404
    code = "NOT_FOUND"


class MethodNotAllowed(RequestRejected):
    """Raised when the path exists but not for this HTTP method."""

    status_code = 405
    code = "METHOD_NOT_ALLOWED"


class PayloadTooLarge(RequestRejected):
    """Raised when a request body exceeds the simulator's limit."""

    status_code = 413
    code = "PAYLOAD_TOO_LARGE"


class BadControlRequest(RequestRejected):
    """Raised when a control API request is malformed (bad JSON, unknown knob, bad value)."""

    code = "BAD_CONTROL_REQUEST"
