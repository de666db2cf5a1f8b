"""Render every API error, ours or the framework's, in one JSON shape.

``{"success": false, "error": {"code", "message", "details"?}}``
"""

import logging

from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.http import Http404, JsonResponse
from django.views import defaults
from rest_framework import exceptions as drf
from rest_framework.response import Response

from common.errors import GatewayError, error_body

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
    if isinstance(exc, GatewayError):
        return Response(error_body(exc.code, exc.message, exc.details), status=exc.status_code)
    if isinstance(exc, Http404):
        exc = drf.NotFound()
    elif isinstance(exc, DjangoPermissionDenied):
        exc = drf.PermissionDenied()
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
        headers["Retry-After"] = str(int(exc.wait) + 1)
    return Response(error_body(code, message, details), status=exc.status_code, headers=headers)


def _is_api(request):
    return request.path.startswith("/api/")


def page_not_found(request, exception=None):
    """404 for unknown routes: JSON under /api/, Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse(
            error_body("NOT_FOUND", f"No route matches {request.path}."), status=404
        )
    return defaults.page_not_found(request, exception)


def server_error(request):
    """500 outside DRF views: JSON under /api/, Django's page elsewhere."""
    if _is_api(request):
        return JsonResponse(error_body("INTERNAL_ERROR", "An internal error occurred."), status=500)
    return defaults.server_error(request)


def bad_request(request, exception=None):
    """400 raised by Django itself (e.g. a disallowed host or suspicious input)."""
    if _is_api(request):
        return JsonResponse(error_body("BAD_REQUEST", "Bad request."), status=400)
    return defaults.bad_request(request, exception)
