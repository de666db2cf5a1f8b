"""How many tokens a call used, as its reply's ``metrics`` say (for a service's tokens_per_minute).

Accepted, at the top of ``metrics`` or under ``metrics.usage``, first match
wins: ``tokens_used`` or ``total_tokens``; else ``input_tokens`` +
``output_tokens`` or ``prompt_tokens`` + ``completion_tokens`` (either
half alone counts). Counts are non-negative numbers; anything else is as if
the reply did not say.
"""

import math

TOTALS = ("tokens_used", "total_tokens")
PAIRS = (("input_tokens", "output_tokens"), ("prompt_tokens", "completion_tokens"))
# More than any call uses: a larger figure is a bug of the service, capped so it cannot block the budget for ever.
MAX_TOKENS = 10**9


def tokens_reported(metrics):
    """The tokens ``metrics`` report, or None when they do not say."""
    if not isinstance(metrics, dict):
        return None
    for source in (metrics, metrics.get("usage")):
        if not isinstance(source, dict):
            continue
        for name in TOTALS:
            total = _count(source.get(name))
            if total is not None:
                return total
        for first, second in PAIRS:
            halves = [_count(source.get(first)), _count(source.get(second))]
            if halves != [None, None]:
                return min(MAX_TOKENS, sum(half or 0 for half in halves))
    return None


def _count(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return min(MAX_TOKENS, int(value))
