"""What the engine reads of API keys on its hot path."""

from typing import NamedTuple

from api_keys.models import ApiKey
from common.row_cache import cached


class LanePolicy(NamedTuple):
    """How a key's jobs share a busy service's line."""

    weight: int = 1  # its share of the turns
    cap: int = 0  # the most calls to one service at once (0: no cap)
    job_cap: int = 0  # the most jobs running at once (0: no cap)


DEFAULT_POLICY = LanePolicy()


def lane_policy(tenant):
    """The policy of the key whose id is ``tenant`` ("" or a deleted key: the default), at most CAO_REGISTRY_CACHE_S old."""
    if not tenant:
        return DEFAULT_POLICY

    def load():
        row = ApiKey.objects.filter(pk=int(tenant)).values_list("share_weight", "max_calls_per_service", "max_concurrent_jobs").first()
        return LanePolicy(*row) if row else DEFAULT_POLICY

    return cached(("lane_policy", tenant), load)


def webhook_signing_secrets(api_key_id, *, now):
    """The secrets that sign a delivery of the key ``api_key_id`` at ``now``: the current one first, then the
    previous one while its grace period lasts. Empty for a deleted key."""
    row = (
        ApiKey.objects.filter(pk=api_key_id)
        .values_list("webhook_secret", "previous_webhook_secret", "previous_webhook_secret_until")
        .first()
    )
    if row is None:
        return []
    current, previous, previous_until = row
    if previous and previous_until is not None and now < previous_until:
        return [current, previous]
    return [current]
