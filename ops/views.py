"""The live overview: its page (an admin page) and the JSON the page polls."""

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.cache import never_cache

from common.staff_data import staff_data_refusal
from ops.overview import overview
from ops.permissions import may_view_overview

# How often the page asks for fresh figures (start to start).
POLL_MS = 1500

REFUSED = "The overview needs a staff login with jobs.view_job and services_registry.view_service."


@never_cache
def overview_page(request):
    """The page; the admin's own wrapper (``admin_view``) sends anyone but staff to the login page."""
    if not may_view_overview(request.user):
        raise PermissionDenied(REFUSED)
    context = {
        **admin.site.each_context(request),
        # A dashboard wants the width; the header links back to everything.
        "is_nav_sidebar_enabled": False,
        "title": "Live overview",
        "snapshot": overview(),
        "data_url": reverse("ops-overview-data"),
        "poll_ms": POLL_MS,
    }
    return render(request, "ops/overview.html", context)


@never_cache
def overview_data(request):
    """The snapshot as JSON; refusals in the one error shape, never a redirect a script would follow."""
    refusal = staff_data_refusal(request, may_read=may_view_overview, refused=REFUSED)
    if refusal is not None:
        return refusal
    return JsonResponse(overview())
