"""What the engine reads of API keys on its hot path."""

from api_keys.models import ApiKey
from common.row_cache import cached


def share_weight(tenant):
    """The share weight of the key whose id is ``tenant`` ("" or a deleted key: 1), at most CAO_REGISTRY_CACHE_S old."""
    if not tenant:
        return 1

    def load():
        weight = ApiKey.objects.filter(pk=int(tenant)).values_list("share_weight", flat=True).first()
        return weight or 1

    return cached(("share_weight", tenant), load)
