from django.urls import path

from services_registry import apis

urlpatterns = [
    path("features", apis.FeatureListApi.as_view(), name="feature-list"),
    path("services", apis.ServiceListApi.as_view(), name="service-list"),
    path("health/services", apis.ServiceHealthApi.as_view(), name="health-services"),
]
