"""The gateway's error model.

Every error a client can see is a ``GatewayError``: it carries its HTTP
status, a stable machine-readable ``code`` and whether retrying can help, as
class attributes (the Django REST framework convention). One exception handler
(``common.api_errors``) renders all of them in the brief's JSON shape.
"""


class GatewayError(Exception):
    """Base class of every error reported to API clients."""

    status_code = 500
    code = "INTERNAL_ERROR"
    default_message = "An internal error occurred."
    retryable = False

    def __init__(self, message=None, *, details=None):
        self.message = message or self.default_message
        self.details = details
        super().__init__(self.message)


class InvalidInput(GatewayError):
    """Raised when a request is well-formed JSON but its content is invalid."""

    status_code = 400
    code = "INVALID_INPUT"
    default_message = "The request is invalid."


class NotFound(GatewayError):
    """Raised when the requested resource does not exist (or is not yours)."""

    status_code = 404
    code = "NOT_FOUND"
    default_message = "Not found."


class Conflict(GatewayError):
    """Raised when the resource's current state forbids the operation."""

    status_code = 409
    code = "CONFLICT"
    default_message = "The operation conflicts with the resource's current state."


class BackendUnavailable(GatewayError):
    """Raised (or mapped from a driver error) when PostgreSQL or Redis cannot serve the request."""

    status_code = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "The gateway's database or Redis is unavailable; retry shortly."
    retryable = True
    retry_after_s = 5


def error_body(code, message, details=None):
    """The one JSON body every error response uses."""
    error = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return {"success": False, "error": error}


def payload_too_large_body(size, limit):
    """The 413 body, for the Django and the ASGI body limits alike."""
    return error_body(
        "PAYLOAD_TOO_LARGE",
        f"The request body is {size} bytes; the limit is {limit} bytes.",
        {"limit_bytes": limit},
    )
