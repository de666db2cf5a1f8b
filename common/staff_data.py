"""The refusals of the staff pages' JSON endpoints, in the API's error shape: never a redirect a script would follow."""

from django.http import JsonResponse

from common.errors import error_body


def staff_data_refusal(request, *, may_read, refused):
    """The answer refusing ``request`` (a read only, by a logged-in user whom ``may_read`` lets in), or None."""
    if request.method not in ("GET", "HEAD"):
        response = JsonResponse(error_body("METHOD_NOT_ALLOWED", f"Method {request.method} not allowed."), status=405)
        response["Allow"] = "GET, HEAD"
        return response
    if not request.user.is_authenticated:
        return JsonResponse(error_body("NOT_AUTHENTICATED", "Log in to the admin first."), status=401)
    if not may_read(request.user):
        return JsonResponse(error_body("PERMISSION_DENIED", refused), status=403)
    return None
