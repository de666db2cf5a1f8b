"""The jobs API: one view per operation; each parses, calls one service or selector, serializes."""

import math
from datetime import timedelta

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from django.utils.dateparse import parse_datetime
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from api_keys.authentication import caller_scope
from api_keys.throttling import JobCreateRateThrottle
from common.errors import InvalidInput
from jobs import selectors
from jobs.models import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, JobStatus
from jobs.monitor import monitor_url
from jobs.permissions import OPERATE_JOBS, READ_JOBS, START_JOBS
from jobs.services import FEATURE_NAME
from orchestration import commands
from webhooks.models import DEFAULT_EVENTS, DELIVERABLE_EVENTS

MAX_IDEMPOTENCY_KEY_LENGTH = 255


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField()
    message = serializers.CharField()
    retryable = serializers.BooleanField()


class AttemptSerializer(serializers.Serializer):
    attempt = serializers.IntegerField()
    outcome = serializers.CharField()
    started_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    duration_ms = serializers.IntegerField(allow_null=True)
    http_status = serializers.IntegerField(allow_null=True)
    error_code = serializers.CharField(allow_blank=True)
    error_message = serializers.CharField(allow_blank=True)


class StepSerializer(serializers.Serializer):
    index = serializers.IntegerField()
    service = serializers.CharField()
    state = serializers.ChoiceField(
        choices=["pending", "waiting", "running", "retrying", "done", "failed", "cancelled"]
    )
    duration_ms = serializers.IntegerField(allow_null=True)
    output = serializers.JSONField(allow_null=True)
    attempts = AttemptSerializer(many=True, source="attempt_history")


class JobSummarySerializer(serializers.Serializer):
    job_id = serializers.UUIDField(source="id")
    feature_name = serializers.CharField()
    status = serializers.ChoiceField(choices=JobStatus.choices)
    current_step_index = serializers.IntegerField()
    total_steps = serializers.IntegerField()
    completed_steps = serializers.IntegerField()
    error = serializers.SerializerMethodField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)
    deadline_at = serializers.DateTimeField(allow_null=True)
    priority = serializers.IntegerField()
    webhook_url = serializers.CharField(allow_null=True, help_text="Where the job's events are POSTed; null: none.")
    webhook_events = serializers.ListField(
        child=serializers.ChoiceField(choices=DELIVERABLE_EVENTS), allow_null=True,
        help_text="The event types delivered to webhook_url; null without a webhook.",
    )

    def to_representation(self, job):
        data = super().to_representation(job)
        data["webhook_url"] = data["webhook_url"] or None
        return data

    @extend_schema(responses=ErrorSerializer(allow_null=True))
    def get_error(self, job) -> dict | None:
        if not job.error_code:
            return None
        return {"code": job.error_code, "message": job.error_message, "retryable": job.retryable}


class JobPageSerializer(serializers.Serializer):
    """One page of jobs; follow ``next`` for older ones."""

    next = serializers.URLField(allow_null=True)
    previous = serializers.URLField(allow_null=True)
    results = JobSummarySerializer(many=True)


class JobDetailSerializer(JobSummarySerializer):
    """A job with its step timeline, which the view reads and passes as ``context["steps"]``."""

    steps = serializers.SerializerMethodField()
    context = serializers.JSONField()

    @extend_schema(responses=StepSerializer(many=True))
    def get_steps(self, job) -> list:
        return StepSerializer(self.context["steps"], many=True).data


class JobCreateApi(APIView):
    """Start a feature. Send ``Idempotency-Key`` to make retries of this request safe."""

    session_permissions = {"POST": START_JOBS}

    class JobCreateInputSerializer(serializers.Serializer):
        feature_name = serializers.RegexField(
            rf"^{FEATURE_NAME.pattern}$", help_text="A feature from GET /api/v1/features, e.g. business_plan."
        )
        input_data = serializers.DictField(
            required=False, default=dict, help_text="Parameters passed to every step (a JSON object)."
        )
        deadline_s = serializers.FloatField(
            required=False,
            help_text="Seconds from now the job must be done in (more than 0, at most CAO_MAX_DEADLINE_S, a week "
            "by default). No call starts after it, a call in flight is cut off at it, and the job fails with "
            "DEADLINE_EXCEEDED. Or give deadline_at.",
        )
        deadline_at = serializers.DateTimeField(
            required=False,
            help_text="The same as an ISO 8601 time, e.g. 2026-12-03T12:00:00Z (UTC without an offset).",
        )
        priority = serializers.IntegerField(
            required=False,
            default=DEFAULT_PRIORITY,
            min_value=MIN_PRIORITY,
            max_value=MAX_PRIORITY,
            help_text=f"From {MIN_PRIORITY} to {MAX_PRIORITY}, {DEFAULT_PRIORITY} by default. While the job waits "
            "for a busy service, a higher priority goes first among the jobs of the same API key; a job waiting "
            "CAO_PRIORITY_AGING_S (10 s) longer counts as one point higher, so a low priority never starves. "
            "Different keys take turns whatever their priorities.",
        )

        webhook_url = serializers.CharField(
            required=False,
            allow_blank=True,
            trim_whitespace=False,
            max_length=None,
            help_text="Where to POST the job's events (Standard Webhooks: signed with your API key's secret, from "
            "GET /api/v1/webhooks/secret; retried with backoff for 24 h). http or https, at most "
            "CAO_WEBHOOK_MAX_URL_LENGTH (2000) characters; loopback, link-local and private addresses are refused "
            "unless the operator allows them (CAO_WEBHOOK_ALLOWED_HOSTS). Needs an API key.",
        )
        webhook_events = serializers.ListField(
            child=serializers.CharField(),
            required=False,
            allow_empty=True,
            help_text="Which event types to deliver: any of " + ", ".join(DELIVERABLE_EVENTS) + "; by default "
            + ", ".join(DEFAULT_EVENTS) + " (how the job ends).",
        )

        def validate(self, attrs):
            if "deadline_s" in attrs and "deadline_at" in attrs:
                raise serializers.ValidationError({"deadline_at": "Give deadline_s or deadline_at, not both."})
            return attrs

        def validate_deadline_s(self, value):
            if isinstance(self.initial_data.get("deadline_s"), bool) or not math.isfinite(value):
                raise serializers.ValidationError("A number of seconds is required.")
            if not 0 < value <= settings.CAO_MAX_DEADLINE_S:
                raise serializers.ValidationError(
                    f"Must be more than 0 and at most {settings.CAO_MAX_DEADLINE_S:g} seconds."
                )
            return value

        def validate_priority(self, value):
            # DRF would take "3", 3.0 and true; a JSON integer is asked for.
            given = self.initial_data.get("priority", value)
            if isinstance(given, bool) or not isinstance(given, int):
                raise serializers.ValidationError("A whole number is required.")
            return value

        def validate_deadline_at(self, value):
            left_s = (value - timezone.now()).total_seconds()
            if left_s <= 0:
                raise serializers.ValidationError("Must be in the future.")
            if left_s > settings.CAO_MAX_DEADLINE_S:
                raise serializers.ValidationError(
                    f"Must be at most {settings.CAO_MAX_DEADLINE_S:g} seconds from now."
                )
            return value

        def deadline(self):
            """The job's deadline from the validated input, or None."""
            data = self.validated_data
            if "deadline_s" in data:
                return timezone.now() + timedelta(seconds=data["deadline_s"])
            return data.get("deadline_at")

    class JobCreatedSerializer(serializers.Serializer):
        success = serializers.BooleanField()
        job_id = serializers.UUIDField()
        monitor_url = serializers.CharField()
        status = serializers.CharField()

    @extend_schema(
        summary="Create a job",
        request=JobCreateInputSerializer,
        responses={201: JobCreatedSerializer, 200: JobCreatedSerializer},
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                location=OpenApiParameter.HEADER,
                required=False,
                description="The same key from the same client returns the same job (200) instead of a new one.",
            )
        ],
    )
    def post(self, request):
        serializer = self.JobCreateInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        owner, _ = caller_scope(request)
        job, created = commands.submit_job(
            feature_name=serializer.validated_data["feature_name"],
            input_data=serializer.validated_data["input_data"],
            owner=owner,
            idempotency_key=_idempotency_key(request),
            deadline_at=serializer.deadline(),
            priority=serializer.validated_data["priority"],
            webhook_url=serializer.validated_data.get("webhook_url"),
            webhook_events=serializer.validated_data.get("webhook_events"),
        )
        body = {
            "success": True,
            "job_id": job.id,
            "monitor_url": monitor_url(request, job.id, key=owner),
            "status": job.status,
        }
        return Response(
            self.JobCreatedSerializer(body).data,
            status=status.HTTP_201_CREATED if created else status.HTTP_200_OK,
        )


def _idempotency_key(request):
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable characters.",
            details={"Idempotency-Key": "invalid"},
        )
    return key


class JobPagination(CursorPagination):
    ordering = ("-created_at", "-id")
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200

    def decode_cursor(self, request):
        # DRF answers 404 for a garbled cursor and trusts its position, which
        # is compared with created_at: both are bad requests.
        try:
            cursor = super().decode_cursor(request)
        except NotFound:
            cursor = False
        if cursor is False or (cursor and cursor.position is not None and not _is_datetime(cursor.position)):
            raise InvalidInput(
                "The cursor is invalid; use a page's next or previous URL as given.", details={"cursor": "invalid"}
            )
        return cursor


def _is_datetime(text):
    try:
        return parse_datetime(text) is not None
    except ValueError:
        return False


# Blank means "any", as an HTML form's empty option sends it. Published as
# one pattern that admits the empty value: DRF's allow_blank would be
# published as "pattern or empty", a oneOf that the empty value matches
# twice, so the schema itself would call it invalid.
FEATURE_FILTER_PATTERN = rf"^(?:{FEATURE_NAME.pattern})?$"


class JobListApi(APIView):
    """Your jobs, newest first (staff keys see everyone's)."""

    session_permissions = {"GET": READ_JOBS}

    class JobListFilterSerializer(serializers.Serializer):
        # Blank means "any", as an HTML form's empty option sends it.
        status = serializers.ChoiceField(choices=JobStatus.choices, required=False, allow_blank=True)
        feature_name = serializers.RegexField(FEATURE_FILTER_PATTERN, required=False, allow_blank=True)
        limit = serializers.IntegerField(
            min_value=1, max_value=JobPagination.max_page_size, required=False, help_text="Page size."
        )
        cursor = serializers.CharField(
            required=False, allow_blank=True, help_text="The cursor from a previous page's next/previous URL."
        )

        def validate(self, attrs):
            # DRF reads an empty optional number as "absent"; an empty limit is a mistake.
            if self.initial_data.get("limit") == "":
                raise serializers.ValidationError({"limit": "Give a page size from 1 to 200, or leave limit out."})
            return attrs

    @extend_schema(
        summary="List jobs",
        parameters=[
            JobListFilterSerializer,
            OpenApiParameter(
                "feature_name", str, pattern=FEATURE_FILTER_PATTERN, description="Only jobs of this feature."
            ),
        ],
        responses=JobPageSerializer,
    )
    def get(self, request):
        filters = self.JobListFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        owner, is_staff = caller_scope(request)
        jobs = selectors.job_list(
            owner=owner,
            is_staff=is_staff,
            status=filters.validated_data.get("status"),
            feature_name=filters.validated_data.get("feature_name"),
        )
        paginator = JobPagination()
        page = paginator.paginate_queryset(jobs, request, view=self)
        return paginator.get_paginated_response(JobSummarySerializer(page, many=True).data)


class JobDetailApi(APIView):
    session_permissions = {"GET": READ_JOBS}

    @extend_schema(summary="Get a job", responses=JobDetailSerializer)
    def get(self, request, job_id):
        owner, is_staff = caller_scope(request)
        job = selectors.job_get(job_id, owner=owner, is_staff=is_staff)
        steps = selectors.step_timeline(job, selectors.job_attempts(job))
        return Response(JobDetailSerializer(job, context={"steps": steps}).data)


class JobResumeApi(APIView):
    """Continue a FAILED job from its current step with a fresh attempt budget."""

    session_permissions = {"POST": OPERATE_JOBS}

    class JobResumeInputSerializer(serializers.Serializer):
        force = serializers.BooleanField(
            required=False, default=False, help_text="Resume even a non-retryable failure (staff keys only)."
        )

    class JobResumedSerializer(serializers.Serializer):
        success = serializers.BooleanField()
        job_id = serializers.UUIDField()
        previous_status = serializers.CharField()
        new_status = serializers.CharField()
        resuming_from_step = serializers.IntegerField()

    @extend_schema(summary="Resume a job", request=JobResumeInputSerializer, responses=JobResumedSerializer)
    def post(self, request, job_id):
        serializer = self.JobResumeInputSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        owner, is_staff = caller_scope(request)
        outcome = commands.resume_job(
            job_id=job_id, owner=owner, is_staff=is_staff, force=serializer.validated_data["force"]
        )
        body = {
            "success": True,
            "job_id": outcome.job.id,
            "previous_status": outcome.previous_status,
            "new_status": outcome.job.status,
            "resuming_from_step": outcome.job.current_step_index,
        }
        return Response(self.JobResumedSerializer(body).data)


class JobCancelApi(APIView):
    """Stop a job: no further step starts; a call already running finishes and is recorded."""

    session_permissions = {"POST": OPERATE_JOBS}

    class JobCancelledSerializer(serializers.Serializer):
        success = serializers.BooleanField()
        job_id = serializers.UUIDField()
        previous_status = serializers.CharField()
        new_status = serializers.CharField()

    @extend_schema(summary="Cancel a job", request=None, responses=JobCancelledSerializer)
    def post(self, request, job_id):
        owner, is_staff = caller_scope(request)
        outcome = commands.cancel_job(job_id=job_id, owner=owner, is_staff=is_staff)
        body = {
            "success": True,
            "job_id": outcome.job.id,
            "previous_status": outcome.previous_status,
            "new_status": outcome.job.status,
        }
        return Response(self.JobCancelledSerializer(body).data)


class JobEventsApi(APIView):
    """The job's stored events with seq greater than ``after``, in order."""

    session_permissions = {"GET": READ_JOBS}

    class JobEventsFilterSerializer(serializers.Serializer):
        after = serializers.IntegerField(min_value=0, required=False, default=0)
        limit = serializers.IntegerField(min_value=1, max_value=1000, required=False, default=1000)

    class JobEventsSerializer(serializers.Serializer):
        job_id = serializers.UUIDField()
        events = serializers.ListField(child=serializers.DictField())
        last_seq = serializers.IntegerField()

    @extend_schema(summary="List a job's events", parameters=[JobEventsFilterSerializer], responses=JobEventsSerializer)
    def get(self, request, job_id):
        filters = self.JobEventsFilterSerializer(data=request.query_params)
        filters.is_valid(raise_exception=True)
        owner, is_staff = caller_scope(request)
        job = selectors.job_get(job_id, owner=owner, is_staff=is_staff)
        events = selectors.job_events(job.id, **filters.validated_data)
        last_seq = events[-1]["seq"] if events else filters.validated_data["after"]
        return Response(self.JobEventsSerializer({"job_id": job.id, "events": events, "last_seq": last_seq}).data)


class JobCollectionApi(JobListApi, JobCreateApi):
    """``/jobs``: GET lists (JobListApi), POST creates (JobCreateApi)."""

    session_permissions = {**JobListApi.session_permissions, **JobCreateApi.session_permissions}
    throttle_classes = [JobCreateRateThrottle]
