from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from cao_project.health_api import HealthApi, ReadinessApi
from jobs.views import home
from orchestration.metrics_view import metrics

api_v1 = [
    path("health", HealthApi.as_view(), name="health"),
    path("health/ready", ReadinessApi.as_view(), name="health-ready"),
    path("", include("services_registry.urls")),
    path("", include("jobs.urls")),
    path("", include("webhooks.urls")),
    path("schema", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves its JavaScript separately, so the page works
    # under the Content-Security-Policy (no inline scripts).
    path("docs", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="docs"),
]

urlpatterns = [
    path("", home),
    path("api/v1/", include(api_v1)),
    path("jobs/", include("jobs.page_urls")),
    # The ops console's own pages (the live overview), beside the admin's.
    path("admin/", include("ops.urls")),
    path("admin/", admin.site.urls),
    path("metrics", metrics, name="metrics"),
]

handler400 = "common.api_errors.bad_request"
handler404 = "common.api_errors.page_not_found"
handler500 = "common.api_errors.server_error"
