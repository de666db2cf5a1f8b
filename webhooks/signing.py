"""Standard Webhooks signatures: ``v1,<base64 HMAC-SHA256 of id.timestamp.body>``, one per secret.

The ``standardwebhooks`` package computes each signature, so a receiver
verifying with it (or any Standard Webhooks library) agrees with us byte
for byte. While a rotated key's previous secret is still in its grace
period, both sign, separated by a space, as the spec allows.
"""

import json
from datetime import datetime, timezone

from standardwebhooks import Webhook


def body_of(payload):
    """The request body of an event: compact JSON, the same bytes on every attempt."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def signature_header(*, msg_id, timestamp, body, secrets):
    """The ``webhook-signature`` value: a signature per secret, space separated."""
    at = datetime.fromtimestamp(timestamp, tz=timezone.utc)
    return " ".join(Webhook(secret).sign(msg_id=msg_id, timestamp=at, data=body) for secret in secrets)


def headers(*, msg_id, timestamp, body, secrets):
    """The Standard Webhooks headers of one attempt (``timestamp``: whole seconds since the epoch)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(timestamp)),
        "webhook-signature": signature_header(msg_id=msg_id, timestamp=int(timestamp), body=body, secrets=secrets),
        "content-type": "application/json",
        "user-agent": "cao-gateway-webhooks/1",
    }
