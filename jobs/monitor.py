"""Signed, expiring monitor tokens: the right to watch one job's progress."""

from django.conf import settings
from django.core import signing

SALT = "cao.monitor"


def monitor_token(job_id):
    return signing.dumps(str(job_id), salt=SALT, compress=False)


def token_allows(token, job_id):
    """Whether ``token`` was issued for ``job_id`` and has not expired."""
    try:
        signed_job = signing.loads(token, salt=SALT, max_age=settings.CAO_MONITOR_TOKEN_MAX_AGE_S)
    except signing.BadSignature:  # includes SignatureExpired
        return False
    return signed_job == str(job_id)


def monitor_url(request, job_id):
    """The WebSocket URL to watch ``job_id``, built from the request's host and scheme."""
    scheme = "wss" if request.is_secure() else "ws"
    return f"{scheme}://{request.get_host()}/ws/{job_id}?token={monitor_token(job_id)}"
