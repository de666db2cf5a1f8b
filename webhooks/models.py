"""The webhook outbox: one row per event to deliver, and one per attempt at it.

A ``Delivery`` is written in the transaction or statement that writes its
event (``jobs.events.append_events``), so a committed event with a webhook
always has its row, whatever happens to the message that announces it. The
row is the truth: ``state`` says whether it still has to go, ``attempts``
is bumped by each claim (a conditional update, so two workers never send
the same attempt) and fences the record of that attempt.
"""

from django.db import models
from django.db.models import Q

# Event types a job may ask to be told about by webhook (webhook_events).
# STEP_STARTED and WAITING_FOR_SLOT are progress, not results: the
# WebSocket and the event stream carry them.
DELIVERABLE_EVENTS = (
    "JOB_COMPLETED", "JOB_ERROR", "JOB_CANCELLED", "JOB_RESUMED", "STEP_COMPLETED", "STEP_RETRYING",
)
# What a job without webhook_events is told about: how it ended.
DEFAULT_EVENTS = ("JOB_COMPLETED", "JOB_ERROR", "JOB_CANCELLED")


class DeliveryState(models.TextChoices):
    PENDING = "PENDING", "to be sent (or sent again)"
    DELIVERED = "DELIVERED", "the receiver answered 2xx"
    FAILED = "FAILED", "given up: retried for CAO_WEBHOOK_RETRY_FOR_S, or refused by the address policy"


class Delivery(models.Model):
    """One event of one job, to be POSTed to the job's webhook_url."""

    job = models.ForeignKey("jobs.Job", related_name="webhook_deliveries", on_delete=models.CASCADE)
    seq = models.PositiveIntegerField(help_text="The event's seq in the job's log.")
    event_type = models.CharField(max_length=32)
    payload = models.JSONField(help_text="The event as the event log and the WebSocket show it.")
    url = models.CharField(max_length=2048)
    # Whose secret signs it; a deleted key's deliveries are given up.
    api_key = models.ForeignKey(
        "api_keys.ApiKey", null=True, blank=True, related_name="webhook_deliveries", on_delete=models.SET_NULL
    )
    state = models.CharField(max_length=16, choices=DeliveryState.choices, default=DeliveryState.PENDING)
    attempts = models.PositiveIntegerField(default=0, help_text="Attempts claimed so far.")
    next_attempt_at = models.DateTimeField()
    # A claimed attempt holds the row until then; a worker that died while
    # sending loses it, and the attempt is made again.
    lease_until = models.DateTimeField(null=True, blank=True)
    give_up_at = models.DateTimeField(help_text="No attempt is scheduled after this.")
    created_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["job", "seq"]
        verbose_name_plural = "deliveries"
        constraints = [
            models.UniqueConstraint(fields=["job", "seq"], name="webhook_delivery_event_unique"),
            models.CheckConstraint(condition=Q(state__in=DeliveryState.values), name="webhook_delivery_state_valid"),
        ]
        indexes = [
            # Maintenance's sweep for due deliveries whose message was lost, and the oldest-pending gauge.
            models.Index(
                fields=["next_attempt_at"], name="webhook_delivery_pending_idx",
                condition=Q(state=DeliveryState.PENDING),
            ),
            models.Index(fields=["api_key", "-created_at"], name="webhook_delivery_key_idx"),
        ]

    def __str__(self):
        return f"{self.webhook_id} {self.event_type} ({self.state})"

    @property
    def webhook_id(self):
        """The ``webhook-id`` header: the same on every attempt at this event."""
        return webhook_id(self.job_id, self.seq)


def webhook_id(job_id, seq):
    return f"evt_{str(job_id).replace('-', '')}_{seq}"


class AttemptOutcome(models.TextChoices):
    DELIVERED = "DELIVERED", "2xx"
    HTTP_ERROR = "HTTP_ERROR", "answered, not 2xx"
    TIMEOUT = "TIMEOUT"
    CONNECTION_ERROR = "CONNECTION_ERROR"
    ADDRESS_REFUSED = "ADDRESS_REFUSED", "resolved to an address the policy refuses"
    NO_SECRET = "NO_SECRET", "its API key is gone: nothing to sign with"


class DeliveryAttempt(models.Model):
    """One POST of a delivery and how it ended."""

    delivery = models.ForeignKey(Delivery, related_name="attempt_log", on_delete=models.CASCADE)
    number = models.PositiveIntegerField()
    started_at = models.DateTimeField()
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=32, choices=AttemptOutcome.choices)
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    next_attempt_at = models.DateTimeField(null=True, blank=True, help_text="When it is tried again, if it is.")

    class Meta:
        ordering = ["delivery", "number"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "number"], name="webhook_attempt_number_unique"),
        ]

    def __str__(self):
        return f"{self.delivery_id} attempt {self.number}: {self.outcome}"
