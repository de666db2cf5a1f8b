"""Log lines that say which job they are about, and never carry a secret.

``log_context(job_id=..., step_index=..., service=..., attempt=...)`` binds
fields for everything logged inside it (in this thread or task), and
``bind(...)`` adds to the innermost binding. ``JobContextFilter`` puts the
fields on every record: the readable format appends them, the JSON format
emits them as keys. ``RedactSecretsFilter`` masks INTERNAL_API_KEY,
anything shaped like an API key, and the values of credential-bearing query
parameters (``?token=``, ``api_key=``, ...) before a line is written;
``redact_loggers`` puts it on loggers outside Django's configuration, such
as uvicorn's access and error logs, whose lines carry request URLs.
"""

import contextvars
import logging
import re
from contextlib import contextmanager

from django.conf import settings

JOB_FIELDS = ("job_id", "step_index", "service", "attempt")
API_KEY_PATTERN = re.compile(r"cao_[0-9a-f]{8}_[A-Za-z0-9_\-]{20,}")
# The value of a query parameter that carries a credential, e.g. the monitor
# token of /ws/<job_id>?token=... (a plain "token=3" in a sentence is left alone).
CREDENTIAL_PARAMETER_PATTERN = re.compile(
    r"(?i)([?&](?:token|access_token|api_key|apikey|api-key|key|password|secret)=)[^&\s\"'#]+"
)

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
    """Masks secrets in the message and traceback text.

    String arguments are masked in place, so formatters that read
    ``record.args`` themselves (uvicorn's access log) keep working; a secret
    that only shows once the message is formatted collapses the record to
    its masked text.
    """

    def filter(self, record):
        if isinstance(record.args, tuple):
            record.args = tuple(redact(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: redact(arg) if isinstance(arg, str) else arg for key, arg in record.args.items()}
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
    text = CREDENTIAL_PARAMETER_PATTERN.sub(r"\1***", text)
    return API_KEY_PATTERN.sub("cao_***", text)


# uvicorn's loggers: its error log carries every WebSocket URL, its access
# log every request's, query string included.
SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def redact_loggers(*names):
    """Put RedactSecretsFilter on the loggers ``names`` (once), whatever handlers they have.

    A logger's filters see the records logged on it, not those of its
    children, hence one name per logger that writes.
    """
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactSecretsFilter) for existing in logger.filters):
            logger.addFilter(RedactSecretsFilter())
