"""HTTP middleware: refuse oversized request bodies with 413 before a view reads them.

Security headers come from Django's own SecurityMiddleware (settings
``SECURE_*``); request headers with underscores are dropped earlier, in
``common.asgi_headers``.
"""

from django.conf import settings
from django.http import JsonResponse

from common.errors import payload_too_large_body

_BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


class BodySizeLimitMiddleware:
    """Refuse request bodies over CAO_MAX_BODY_BYTES with 413, before any view reads them."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        limit = settings.CAO_MAX_BODY_BYTES
        if request.method in _BODY_METHODS:
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
            # A chunked body declares no length: measure what arrived.
            size = declared if declared else len(request.body)
            if size > limit:
                return JsonResponse(payload_too_large_body(size, limit), status=413)
        return self.get_response(request)
