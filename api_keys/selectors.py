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
