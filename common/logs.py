"""Log lines that say which job they are about, and never carry a secret.

``log_context(job_id=..., step_index=..., service=..., attempt=...)`` binds
fields for everything logged inside it (in this thread or task), and
``bind(...)`` adds to the innermost binding. ``JobContextFilter`` puts the
fields on every record: the readable format appends them, the JSON format
emits them as keys. ``RedactSecretsFilter`` masks INTERNAL_API_KEY and
anything shaped like an API key before a line is written.
"""

import contextvars
import logging
import re
from contextlib import contextmanager

from django.conf import settings

JOB_FIELDS = ("job_id", "step_index", "service", "attempt")
API_KEY_PATTERN = re.compile(r"cao_[0-9a-f]{8}_[A-Za-z0-9_\-]{20,}")

_context = contextvars.ContextVar("cao_log_context", default=None)


@contextmanager
def log_context(**fields):
    """Bind ``fields`` to every log line written inside the block."""
    current = _context.get() or {}
    token = _context.set({**current, **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind(**fields):
    """Add ``fields`` to the current binding (a no-op outside log_context)."""
    current = _context.get()
    if current is not None:
        current.update(fields)


class JobContextFilter(logging.Filter):
    """Adds job_id, step_index, service and attempt to each record, and a readable suffix."""

    def filter(self, record):
        context = _context.get() or {}
        for name in JOB_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        present = [f"{name}={getattr(record, name)}" for name in JOB_FIELDS if getattr(record, name) is not None]
        record.job_fields = f" [{' '.join(present)}]" if present else ""
        return True


class RedactSecretsFilter(logging.Filter):
    """Masks INTERNAL_API_KEY and API keys in the message and traceback text."""

    def filter(self, record):
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def redact(text):
    secret = getattr(settings, "INTERNAL_API_KEY", "")
    if secret:
        text = text.replace(secret, "***")
    return API_KEY_PATTERN.sub("cao_***", text)
