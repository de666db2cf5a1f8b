"""Errors of step execution, and how they are recorded on a job.

A downstream failure is either transient (worth retrying: the service was
busy, slow, unreachable or answered garbage) or permanent (it refused the
request). Each type carries the code stored on the job and shown to clients.
"""

from jobs.outcomes import Failure


class StepError(Exception):
    """Base class of every error that ends a step attempt."""

    code = "STEP_FAILED"
    retryable = False
    # Whether the failure says the service is unwell (it counts toward its
    # circuit breaker), rather than the request, the deadline or the gateway.
    counts_against_service = False

    def __init__(self, message, *, status_code=None, retry_after_s=None, code=None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        if code:
            self.code = code


class TransientStepError(StepError):
    """Raised when an attempt failed in a way a later attempt may not."""

    retryable = True


class PermanentStepError(StepError):
    """Raised when retrying the same request cannot succeed."""

    retryable = False


class ResourceExhausted(TransientStepError):
    """Raised when the service answered 429 or 503: it is busy, try later."""

    code = "RESOURCE_EXHAUSTED"
    counts_against_service = True


class DownstreamServerError(TransientStepError):
    """Raised when the service answered a 5xx other than 503."""

    code = "DOWNSTREAM_ERROR"
    counts_against_service = True


class DownstreamTimeout(TransientStepError):
    """Raised when the service did not answer within the step's timeout."""

    code = "DOWNSTREAM_TIMEOUT"
    counts_against_service = True
    # The service may still be working on the request: its slot stays held a while.
    call_may_still_run = True


class DeadlineExceeded(DownstreamTimeout):
    """Raised when the job's deadline passed: before its step's call, during it (cut off then) or before a retry.

    A timeout in kind (a call cut off may still be running: its slot is
    held as after any timeout), but not retryable: only a forced resume
    runs the job again, without the deadline.
    """

    code = "DEADLINE_EXCEEDED"
    retryable = False
    counts_against_service = False  # the job's clock ran out, not the service

    def __init__(self, message, *, call_cut_off=True, **kwargs):
        super().__init__(message, **kwargs)
        self.call_may_still_run = call_cut_off


class DownstreamUnreachable(TransientStepError):
    """Raised when no connection to the service could be made."""

    code = "DOWNSTREAM_UNREACHABLE"
    counts_against_service = True


class MalformedResponse(TransientStepError):
    """Raised when the service's reply breaks the envelope contract."""

    code = "MALFORMED_RESPONSE"
    counts_against_service = True


class GatewayFault(TransientStepError):
    """Raised when the gateway itself failed while calling a service or storing its reply."""

    code = "GATEWAY_ERROR"


class DownstreamRejected(PermanentStepError):
    """Raised when the service answered a 4xx other than 429: the request is wrong."""

    code = "DOWNSTREAM_REJECTED"


class ServiceUnavailable(TransientStepError):
    """Raised when the step's service was deleted or disabled in the registry."""

    code = "SERVICE_UNAVAILABLE"


class WorkerLost(TransientStepError):
    """Raised (recorded) when the worker running an attempt vanished."""

    code = "WORKER_LOST"


class StuckDetected(TransientStepError):
    """Recorded when a job made no progress for JOB_STUCK_SECONDS."""

    code = "STUCK_DETECTED"


def reported_failure(code, message, *, retryable, status_code):
    """The error for a 2xx reply whose body says ``"status": "FAILED"``."""
    kind = TransientStepError if retryable else PermanentStepError
    return kind(message, status_code=status_code, code=code or "DOWNSTREAM_FAILED")


def failure_from(error):
    """The job-side record (``jobs.outcomes.Failure``) of a StepError."""
    return Failure(code=error.code, message=error.message, retryable=error.retryable, http_status=error.status_code)
