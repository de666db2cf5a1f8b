"""Errors of the webhooks app: what a client sees at create, and why a delivery attempt failed."""

from common.errors import GatewayError, InvalidInput


class InvalidWebhook(InvalidInput):
    """Raised when webhook_url or webhook_events is not acceptable (shape, scheme, length, event types)."""

    code = "INVALID_WEBHOOK"
    default_message = "The webhook is invalid."


class WebhookAddressNotAllowed(InvalidWebhook):
    """Raised when webhook_url points at a loopback, link-local or private address not in CAO_WEBHOOK_ALLOWED_HOSTS."""

    code = "WEBHOOK_ADDRESS_NOT_ALLOWED"
    default_message = "The webhook URL points at an address that is not allowed."


class WebhookNeedsApiKey(InvalidWebhook):
    """Raised when a caller without an API key (anonymous, a staff session) asks for a webhook."""

    code = "WEBHOOK_NEEDS_API_KEY"
    default_message = "Webhooks are signed with the API key's secret: create the job with an API key."


class AttemptFailed(Exception):
    """Raised when one delivery attempt did not get a 2xx; ``outcome`` says how, ``retryable`` whether to try again."""

    def __init__(self, outcome, message, *, status_code=None, retryable=True):
        super().__init__(message)
        self.outcome = outcome
        self.message = message
        self.status_code = status_code
        self.retryable = retryable


class SecretNeedsApiKey(GatewayError):
    """Raised when a caller without an API key (anonymous clients) asks for a signing secret."""

    status_code = 403
    code = "API_KEY_REQUIRED"
    default_message = "Each API key has its own signing secret: send one to read it."
