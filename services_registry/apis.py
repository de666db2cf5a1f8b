"""Read-only registry endpoints: features, services and their health."""

from django.conf import settings
from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from services_registry import selectors
from services_registry.health import check_services


class FeatureListApi(APIView):
    """The features (recipes) a client can start, with their steps."""

    # What a staff session needs, as the admin grants it (any one will do).
    session_permissions = {"GET": ("services_registry.view_recipe", "services_registry.change_recipe")}

    class FeatureSerializer(serializers.Serializer):
        name = serializers.CharField()
        description = serializers.CharField()
        steps = serializers.ListField(child=serializers.CharField())
        total_steps = serializers.IntegerField()

    @extend_schema(responses=FeatureSerializer(many=True), summary="List features")
    def get(self, request):
        features = [
            {
                "name": recipe.name,
                "description": recipe.description,
                "steps": [service.name for service in steps],
                "total_steps": len(steps),
            }
            for recipe in selectors.recipe_list(enabled_only=True)
            for steps in [selectors.recipe_steps(recipe)]
        ]
        return Response(self.FeatureSerializer(features, many=True).data)


class ServiceListApi(APIView):
    """The downstream services and their limits."""

    session_permissions = {"GET": ("services_registry.view_service", "services_registry.change_service")}

    class ServiceSerializer(serializers.Serializer):
        name = serializers.CharField()
        queue = serializers.CharField()
        concurrency_limit = serializers.IntegerField()
        timeout_s = serializers.FloatField(
            source="effective_timeout_s", help_text="Read timeout of one call (the service's, else the default)."
        )
        lease_ttl_s = serializers.FloatField()
        max_attempts = serializers.IntegerField()
        enabled = serializers.BooleanField()

    @extend_schema(responses=ServiceSerializer(many=True), summary="List services")
    def get(self, request):
        return Response(self.ServiceSerializer(selectors.service_list(), many=True).data)


class ServiceHealthApi(APIView):
    """Checks every enabled service's health URL concurrently."""

    session_permissions = ServiceListApi.session_permissions

    check_serializer = inline_serializer(
        "ServiceHealthCheck",
        fields={
            "ok": serializers.BooleanField(),
            "status_code": serializers.IntegerField(required=False),
            "error": serializers.CharField(required=False),
            "latency_ms": serializers.FloatField(),
        },
    )

    @extend_schema(
        summary="Check downstream services",
        responses=inline_serializer(
            "ServiceHealth",
            fields={
                "ok": serializers.BooleanField(),
                "services": serializers.DictField(child=check_serializer),
            },
        ),
    )
    def get(self, request):
        results = check_services(
            selectors.service_list(enabled_only=True), timeout_s=settings.CAO_HEALTH_TIMEOUT_S
        )
        return Response({"ok": all(result["ok"] for result in results.values()), "services": results})
