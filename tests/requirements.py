"""What a test needs from the machine, and what happens when it is missing.

A developer's machine may lack RabbitMQ, Chromium or PostgreSQL's server
binaries: there a skip that says why is the honest answer. CI must run
everything, so under ``CI=true`` a missing requirement fails the test with
the same reason instead of skipping it (a green run that skipped the broker
or browser tests proves nothing about them).

This module is the one place that makes that decision; fixtures call
``require(condition, reason)``.
"""

import os

import pytest

TRUE_VALUES = {"1", "true", "yes", "on"}


def in_ci(environ=None):
    """Whether this run is CI's (``CI`` set to a true value, as CI services do)."""
    return (environ if environ is not None else os.environ).get("CI", "").strip().lower() in TRUE_VALUES


def require(condition, reason, *, environ=None):
    """Return when ``condition`` holds; otherwise skip with ``reason``, or fail with it under CI."""
    if condition:
        return
    if in_ci(environ):
        pytest.fail(f"{reason} [CI=true: a missing requirement fails the run instead of skipping]", pytrace=False)
    pytest.skip(reason)
