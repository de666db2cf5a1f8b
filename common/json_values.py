"""JSON that PostgreSQL's jsonb can store: strict parsing and a storability check.

Python's json module accepts what jsonb refuses: ``NaN`` and ``Infinity``
literals, numbers that overflow to infinity (``1e999``), the NUL character
and lone UTF-16 surrogates (``"\\ud800"``). Anything read from a client or a
downstream service goes through here before it reaches the database, so a
value that cannot be stored is refused with a reason instead of failing the
transaction that would store it.
"""

import json
import math


class InvalidJSON(ValueError):
    """Raised when a document is not strict JSON, or holds a number jsonb cannot store."""


def _no_constant(name):
    raise InvalidJSON(f"{name} is not a JSON number")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise InvalidJSON(f"the number {text[:20]} is too large to store")
    return value


def loads(text):
    """Parse ``text`` (str or bytes) strictly; raises InvalidJSON (a ValueError)."""
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except InvalidJSON:
        raise
    except RecursionError:
        # json recurses per nesting level; "[[[[..." must not escape as a crash.
        raise InvalidJSON("the document is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise InvalidJSON(str(exc)) from None


def unstorable_reason(value, *, max_depth):
    """Why ``value`` cannot be stored as jsonb (or is nested deeper than ``max_depth``); None if it can."""
    # Walk without recursion: the depth itself is what is being checked.
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > max_depth:
            return f"nested more than {max_depth} levels deep"
        if isinstance(item, dict):
            for key, child in item.items():
                reason = _string_reason(key)
                if reason:
                    return reason
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            reason = _string_reason(item)
            if reason:
                return reason
        elif isinstance(item, float) and not math.isfinite(item):
            return "contains a non-finite number (NaN or Infinity)"
    return None


def _string_reason(text):
    if not isinstance(text, str):
        return None
    if "\x00" in text:
        return "contains the NUL character (\\u0000)"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone UTF-16 surrogate (invalid Unicode)"
    return None
