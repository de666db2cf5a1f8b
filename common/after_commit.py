"""Run a side effect once the current transaction commits, without failing the caller."""

import functools

from django.db import transaction


def after_commit(func, /, *args, **kwargs):
    """``func(*args, **kwargs)`` after commit; an error is logged by Django, not raised.

    Side effects after commit (messages, hand-offs, metrics) must not turn a
    committed change into an error: maintenance repairs what a failed one
    left undone.
    """

    @functools.wraps(func)
    def run():
        return func(*args, **kwargs)

    # Django names the callback when it logs a failure; partials have no name.
    transaction.on_commit(run, robust=True)
