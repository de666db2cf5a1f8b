"""Jobs, their per-attempt history and their event log.

A job's lifecycle is ``JobStatus`` plus ``TRANSITIONS``; the position of the
current step within that lifecycle is ``StepState``. Every change goes
through ``jobs.services`` and ``jobs.steps``, under a row lock or as a statement conditional on
the row being unchanged (``jobs.writes``), so racing actors (two resumes, a
cancel and a finishing step, a redelivered message) cannot both win.
"""

import uuid

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q

# Job priorities: higher is served first within its owner's share of a service.
MIN_PRIORITY, DEFAULT_PRIORITY, MAX_PRIORITY = -10, 0, 10


class JobStatus(models.TextChoices):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.PENDING, JobStatus.RUNNING})

# Allowed status moves; anything else raises IllegalTransition.
TRANSITIONS = {
    JobStatus.PENDING: {JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.RUNNING: {JobStatus.RUNNING, JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.FAILED: {JobStatus.RUNNING, JobStatus.CANCELLED},
    JobStatus.COMPLETED: set(),
    JobStatus.CANCELLED: set(),
}


class StepState(models.TextChoices):
    """Where the current step is; meaningful while the job is active."""

    QUEUED = "QUEUED", "message sent, not yet picked up"
    WAITING = "WAITING", "parked, waiting for a slot of its service"
    RUNNING = "RUNNING", "holding a slot, downstream call in flight"
    HELD = "HELD", "waiting for one of its API key's places (the key runs as many jobs as it may)"
    IDLE = "IDLE", "nothing in flight (job finished, failed or cancelled)"


class Job(models.Model):
    """One run of a recipe (feature) for one client request."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    feature_name = models.CharField(max_length=64)
    # The recipe's service names at creation: editing a recipe never changes
    # a job that already exists.
    steps = models.JSONField()
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING)
    current_step_index = models.PositiveIntegerField(default=0)
    step_state = models.CharField(max_length=16, choices=StepState.choices, default=StepState.QUEUED)
    # Fencing token of the current step: bumped at every dispatch, carried by
    # the step message and by the lease, so stale messages and late results of
    # a presumed-dead worker are recognised and dropped.
    step_token = models.PositiveIntegerField(default=1)
    # Attempts of the current step since it started or the job was resumed.
    step_attempt = models.PositiveIntegerField(default=0)
    step_due_at = models.DateTimeField(null=True, blank=True)
    step_started_at = models.DateTimeField(null=True, blank=True)
    context = models.JSONField(default=dict)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    retryable = models.BooleanField(default=False)
    owner = models.ForeignKey(
        "api_keys.ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs"
    )
    idempotency_key = models.CharField(max_length=255, null=True, blank=True)
    last_event_seq = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_progress_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The client's deadline: no call starts after it, a call in flight is cut
    # off at it, and a job still waiting then fails (DEADLINE_EXCEEDED).
    deadline_at = models.DateTimeField(null=True, blank=True)
    # Within its owner's share of a busy service, a higher priority goes first
    # (aged by CAO_PRIORITY_AGING_S, so a lower one never starves).
    priority = models.SmallIntegerField(
        default=DEFAULT_PRIORITY,
        db_default=DEFAULT_PRIORITY,  # rows written by code that predates the field
        validators=[MinValueValidator(MIN_PRIORITY), MaxValueValidator(MAX_PRIORITY)]
    )
    # Where to POST the job's events (webhooks app), and which types; "" and null: no webhook.
    webhook_url = models.CharField(max_length=2048, blank=True, default="", db_default="")
    webhook_events = models.JSONField(null=True, blank=True, default=None)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                nulls_distinct=False,
                name="job_idempotency_key_unique_per_owner",
            ),
            models.CheckConstraint(
                condition=Q(status__in=JobStatus.values), name="job_status_valid"
            ),
            models.CheckConstraint(
                condition=Q(step_state__in=StepState.values), name="job_step_state_valid"
            ),
        ]
        indexes = [
            models.Index(fields=["status", "step_state", "step_due_at"], name="job_maintenance_idx"),
            models.Index(fields=["status", "last_progress_at"], name="job_stuck_idx"),
            models.Index(fields=["feature_name", "status"], name="job_feature_status_idx"),
            models.Index(fields=["owner", "-created_at"], name="job_owner_recent_idx"),
            # Recent jobs first: the API list, the pages and the admin sort by it.
            models.Index(fields=["-created_at"], name="job_recent_idx"),
            # Maintenance's sweep of jobs waiting past their deadline.
            models.Index(
                fields=["deadline_at"], name="job_deadline_idx", condition=Q(deadline_at__isnull=False)
            ),
            # A capped key's running jobs, counted at every admission, and its held ones.
            models.Index(
                fields=["owner", "step_state"], name="job_owner_active_idx",
                condition=Q(status__in=["PENDING", "RUNNING"]),
            ),
        ]

    def __str__(self):
        return f"{self.feature_name} {self.id} ({self.status})"

    @property
    def total_steps(self):
        return len(self.steps)

    @property
    def current_service(self):
        """The service of the current step, or None once past the last step."""
        if self.current_step_index < len(self.steps):
            return self.steps[self.current_step_index]
        return None

    @property
    def completed_steps(self):
        if self.status == JobStatus.COMPLETED:
            return len(self.steps)
        return sum(1 for index, service in enumerate(self.steps) if step_key(index, service) in self.context)

    @property
    def is_terminal(self):
        return self.status in TERMINAL_STATUSES


def step_key(index, service):
    """Where a step's output lives in ``Job.context``."""
    return f"step_{index}_{service}"


class AttemptOutcome(models.TextChoices):
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    LOST = "LOST", "worker vanished mid-call"


class StepAttempt(models.Model):
    """One attempt at one step: a downstream call and how it ended."""

    job = models.ForeignKey(Job, related_name="attempts", on_delete=models.CASCADE)
    step_index = models.PositiveIntegerField()
    service = models.CharField(max_length=64)
    attempt = models.PositiveIntegerField(help_text="Attempt number within the current attempt budget.")
    token = models.PositiveIntegerField(help_text="The step token this attempt ran under.")
    outcome = models.CharField(max_length=16, choices=AttemptOutcome.choices, default=AttemptOutcome.RUNNING)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    http_status = models.PositiveIntegerField(null=True, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)

    class Meta:
        ordering = ["job", "started_at", "id"]
        constraints = [
            models.UniqueConstraint(fields=["job", "token"], name="step_attempt_token_unique"),
        ]
        indexes = [
            # The ops overview's calls, failures and p95 latency per service over
            # the last minutes: a range of finished_at, read from the index alone.
            models.Index(
                fields=["finished_at"],
                include=["service", "outcome", "duration_ms"],
                condition=Q(finished_at__isnull=False),
                name="attempt_finished_idx",
            ),
        ]

    def __str__(self):
        return f"{self.job_id} step {self.step_index} attempt {self.attempt}: {self.outcome}"


class EventType(models.TextChoices):
    WAITING_FOR_SLOT = "WAITING_FOR_SLOT"
    STEP_STARTED = "STEP_STARTED"
    STEP_RETRYING = "STEP_RETRYING"
    STEP_COMPLETED = "STEP_COMPLETED"
    JOB_COMPLETED = "JOB_COMPLETED"
    JOB_ERROR = "JOB_ERROR"
    JOB_RESUMED = "JOB_RESUMED"
    JOB_CANCELLED = "JOB_CANCELLED"


# The events that end a run of a job: it completed, or it failed (and may be resumed).
JOB_END_EVENTS = (EventType.JOB_COMPLETED, EventType.JOB_ERROR)


class JobEvent(models.Model):
    """One entry of a job's gapless event log (seq 1, 2, 3, ... per job)."""

    job = models.ForeignKey(Job, related_name="events", on_delete=models.CASCADE)
    seq = models.PositiveIntegerField()
    type = models.CharField(max_length=32, choices=EventType.choices)
    payload = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["job", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["job", "seq"], name="job_event_seq_unique"),
        ]
        indexes = [
            # The ops overview's jobs ended per minute: one or two rows per job
            # among its many events, so the index stays small.
            models.Index(
                fields=["created_at"],
                include=["type"],
                condition=Q(type__in=JOB_END_EVENTS),
                name="job_event_end_idx",
            ),
        ]

    def __str__(self):
        return f"{self.job_id} #{self.seq} {self.type}"
