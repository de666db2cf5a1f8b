"""Liveness and readiness of this process."""

from drf_spectacular.utils import extend_schema, inline_serializer
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from common.backends import check_database, check_redis


class HealthApi(APIView):
    """Liveness: the process answers. Cheap and touches no backend."""

    authentication_classes = []
    permission_classes = []
    throttle_classes = []

    @extend_schema(
        summary="Liveness", responses=inline_serializer("Health", {"ok": serializers.BooleanField()})
    )
    def get(self, request):
        return Response({"ok": True})


class ReadinessApi(APIView):
    """Readiness: PostgreSQL and Redis answer. 503 when either does not."""

    authentication_classes = []
    permission_classes = []
    throttle_classes = []

    @extend_schema(
        summary="Readiness",
        responses=inline_serializer(
            "Readiness",
            {
                "ok": serializers.BooleanField(),
                "database": serializers.CharField(),
                "redis": serializers.CharField(),
            },
        ),
    )
    def get(self, request):
        problems = {"database": check_database(), "redis": check_redis()}
        body = {name: problem or "ok" for name, problem in problems.items()}
        ok = not any(problems.values())
        return Response({"ok": ok, **body}, status=200 if ok else 503)
