"""The gateway's Prometheus metrics, recorded by whichever process does the work.

Counters and histograms are process-local objects; with PROMETHEUS_MULTIPROC_DIR
set (``make run`` and docker-compose set it), prometheus_client writes them to
files there and the /metrics view adds up every process on the host: API,
workers and scheduler. Gauges that describe shared state (slots, waiters,
queue depth) are read at scrape time instead (orchestration.metrics_view).
"""

from prometheus_client import Counter, Histogram

# Downstream calls take from milliseconds to minutes (video generation).
CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)

JOBS_CREATED = Counter("cao_jobs_created_total", "Jobs created.", ["feature"])
JOBS_COMPLETED = Counter("cao_jobs_completed_total", "Jobs that completed every step.", ["feature"])
# Counted where jobs.steps records the change, once it is committed.
JOBS_FAILED = Counter("cao_jobs_failed_total", "Jobs that stopped with an error.", ["feature", "error_code"])
STEP_DURATION = Histogram(
    "cao_step_duration_seconds",
    "Duration of downstream calls, by service and outcome (success or an error code).",
    ["service", "outcome"],
    buckets=CALL_BUCKETS,
)
SLOT_WAIT = Histogram(
    "cao_slot_wait_seconds",
    "How long steps that found their service full waited for a slot.",
    ["service"],
    buckets=WAIT_BUCKETS,
)
STEP_RETRIES = Counter(
    "cao_step_retries_total", "Step attempts that failed and were scheduled again.", ["service", "error_code"]
)

# Webhook deliveries (webhooks.delivery), counted once their record is committed.
WEBHOOK_DELIVERED = Counter("cao_webhook_delivered_total", "Webhook deliveries the receiver accepted (2xx).")
WEBHOOK_FAILED = Counter(
    "cao_webhook_attempts_failed_total",
    "Webhook delivery attempts that failed, by outcome (HTTP_ERROR, TIMEOUT, CONNECTION_ERROR, ADDRESS_REFUSED, "
    "NO_SECRET).",
    ["outcome"],
)
WEBHOOK_GAVE_UP = Counter(
    "cao_webhook_given_up_total", "Webhook deliveries given up, by the outcome of their last attempt.", ["outcome"]
)


def observe_call(service, reply, seconds):
    """Record one downstream call; ``reply`` is a ServiceReply or a StepError."""
    outcome = getattr(reply, "code", None) or "success"
    STEP_DURATION.labels(service, outcome).observe(seconds)


def observe_slot_wait(service, seconds):
    SLOT_WAIT.labels(service).observe(max(0.0, seconds))

