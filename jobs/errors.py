"""Errors of the jobs domain, each carrying its HTTP meaning."""

from common.errors import Conflict, GatewayError, InvalidInput, NotFound


class JobNotFound(NotFound):
    """Raised when a job id is unknown, malformed, or belongs to another client."""

    code = "JOB_NOT_FOUND"
    default_message = "No such job."


class UnknownFeature(InvalidInput):
    """Raised when a client asks for a feature no recipe provides."""

    code = "UNKNOWN_FEATURE"


class FeatureUnavailable(InvalidInput):
    """Raised when the feature or one of its services is disabled."""

    code = "FEATURE_DISABLED"


class JobNotResumable(Conflict):
    """Raised when resume is asked of a job that cannot continue."""

    code = "JOB_NOT_RESUMABLE"


class JobNotCancellable(Conflict):
    """Raised when cancel is asked of a finished job."""

    code = "JOB_NOT_CANCELLABLE"


class IdempotencyKeyReused(Conflict):
    """Raised when an Idempotency-Key comes back with a different request."""

    code = "IDEMPOTENCY_KEY_REUSED"


class IllegalTransition(Conflict):
    """Raised when a status change is not in the transition table."""

    code = "ILLEGAL_TRANSITION"


class ForceNotAllowed(GatewayError):
    """Raised when a non-staff client asks for a forced resume."""

    status_code = 403
    code = "FORCE_REQUIRES_STAFF"
    default_message = "Only staff keys may force-resume a job that is not retryable."
