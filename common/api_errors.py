"""Render every API error, ours or the framework's, in one JSON shape.

``{"success": false, "error": {"code", "message", "details"?}}``
"""

import logging
import math
import sys

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions as drf
from rest_framework.response import Response

from common.backends import BACKEND_ERRORS
from common.errors import BackendUnavailable, GatewayError, error_body

logger = logging.getLogger(__name__)

# Codes for DRF's own exceptions; anything not listed uses DRF's default code.
_DRF_CODES = {
    drf.ParseError: ("MALFORMED_JSON", None),
    drf.ValidationError: ("INVALID_INPUT", "The request is invalid."),
    drf.AuthenticationFailed: ("AUTHENTICATION_FAILED", None),
    drf.NotAuthenticated: ("NOT_AUTHENTICATED", None),
    drf.PermissionDenied: ("PERMISSION_DENIED", None),
    drf.NotFound: ("NOT_FOUND", None),
    drf.MethodNotAllowed: ("METHOD_NOT_ALLOWED", None),
    drf.NotAcceptable: ("NOT_ACCEPTABLE", None),
    drf.UnsupportedMediaType: ("UNSUPPORTED_MEDIA_TYPE", None),
    drf.Throttled: ("THROTTLED", None),
}




def exception_handler(exc, context):
    """DRF exception handler: every error becomes the brief's error body."""
    if isinstance(exc, BACKEND_ERRORS):
        # The request cannot be served now, but will be once they are back
        # (503 + Retry-After, never a 500).
        logger.warning("Backend unavailable: %s: %s", type(exc).__name__, str(exc).strip()[:200])
        exc = BackendUnavailable()
    if isinstance(exc, GatewayError):
        headers = {"Retry-After": str(exc.retry_after_s)} if getattr(exc, "retry_after_s", None) else None
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code, headers=headers)
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
    elif isinstance(exc, DjangoValidationError):
        exc = drf.ValidationError(exc.messages)
    if isinstance(exc, drf.APIException):
        return _drf_response(exc)
    view = context.get("view")
    logger.exception("Unhandled error in %s", type(view).__name__ if view else "API view")
    return Response(
        error_body("INTERNAL_ERROR", "An internal error occurred."), status=500
    )


def _drf_response(exc):
    code, message = next(
        (value for cls, value in _DRF_CODES.items() if isinstance(exc, cls)),
        (str(exc.default_code).upper(), None),
    )
    details = None
    if isinstance(exc, drf.ValidationError):
        details = exc.detail
    elif message is None:
        message = str(exc.detail)
    headers = {}
    if getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = exc.auth_header
    if getattr(exc, "wait", None) is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.wait)))  # DRF rounds up already
    return Response(error_body(code, message, details), status=exc.status_code, headers=headers)


def _is_api(request):
    return request.path.startswith("/api/")


def backend_unavailable_response(request):
    """503 + Retry-After for a request that failed on PostgreSQL or Redis outside DRF."""
    error = BackendUnavailable()
    headers = {"Retry-After": str(error.retry_after_s)}
    if _is_api(request):
        response = JsonResponse(error_body(error.code, error.message), status=503)
    else:
        response = HttpResponse(
            "<h1>Service unavailable</h1><p>The database or Redis is unavailable; retry shortly.</p>",
            status=503,
        )
    for name, value in headers.items():
        response[name] = value
    return response


def page_not_found(request, exception=None):
    """404 for unknown routes: JSON under /api/, Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse(
            error_body("NOT_FOUND", f"No route matches {request.path}."), status=404
        )
    return defaults.page_not_found(request, exception)


def server_error(request):
    """500 outside DRF views: JSON under /api/, Django's page elsewhere.

    Django calls it while handling the exception, so a PostgreSQL or Redis
    outage (in a middleware, a page or the admin) is still told apart: 503.
    """
    if isinstance(sys.exc_info()[1], BACKEND_ERRORS):
        return backend_unavailable_response(request)
    if _is_api(request):
        return JsonResponse(error_body("INTERNAL_ERROR", "An internal error occurred."), status=500)
    return defaults.server_error(request)


def bad_request(request, exception=None):
    """400 raised by Django itself (e.g. a disallowed host or suspicious input)."""
    if _is_api(request):
        return JsonResponse(error_body("BAD_REQUEST", "Bad request."), status=400)
    return defaults.bad_request(request, exception)
