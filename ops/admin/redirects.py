"""Where the console's own buttons send ops afterwards."""

from django.contrib.admin.templatetags.admin_urls import add_preserved_filters
from django.contrib.admin.utils import quote
from django.shortcuts import redirect
from django.urls import reverse


def back_to_change_page(model_admin, request, obj):
    """Redirect to ``obj``'s admin page, keeping the list filters it was opened from."""
    opts = model_admin.opts
    url = reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[quote(obj.pk)])
    context = {"opts": opts, "preserved_filters": model_admin.get_preserved_filters(request)}
    return redirect(add_preserved_filters(context, url))
