"""Signed, expiring monitor tokens: the right to watch one job's progress.

A token names its job and the API key it was issued to (the job's owner;
none when a staff session started the job). It opens the socket only while
that key is active, so deactivating or deleting a key also closes the door
to its jobs' sockets. Tokens that name no key, including those issued before
tokens named one, need the job's owner, if it has one, to be active.
"""

import uuid

from django.conf import settings
from django.core import signing

from api_keys.models import ApiKey

SALT = "cao.monitor"


def monitor_token(job_id, *, key=None):
    payload = str(job_id) if key is None else f"{job_id}/{key.pk}"
    return signing.dumps(payload, salt=SALT, compress=False)


def token_allows(token, job_id):
    """Whether ``token`` was issued for ``job_id``, has not expired, and its key is still active.

    Reads the database: async code calls it through a thread.
    """
    try:
        signed = signing.loads(token, salt=SALT, max_age=settings.CAO_MONITOR_TOKEN_MAX_AGE_S)
    except signing.BadSignature:  # includes SignatureExpired
        return False
    if not isinstance(signed, str):
        return False
    signed_job, _, key_id = signed.partition("/")
    if signed_job != str(job_id):
        return False
    if key_id:
        return ApiKey.objects.filter(pk=key_id, is_active=True).exists()
    return _owner_is_active(job_id)


def _owner_is_active(job_id):
    try:
        job_uuid = uuid.UUID(str(job_id))
    except ValueError:
        return True  # no such job: the consumer answers 4404
    return not ApiKey.objects.filter(jobs__pk=job_uuid, is_active=False).exists()


def monitor_url(request, job_id, *, key=None):
    """The WebSocket URL to watch ``job_id``, built from the request's host and scheme, for ``key``."""
    scheme = "wss" if request.is_secure() else "ws"
    return f"{scheme}://{request.get_host()}/ws/{job_id}?token={monitor_token(job_id, key=key)}"
