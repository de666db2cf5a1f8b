"""Settings for CAO Gateway.

This is the only module that reads the environment. Application code reads
``django.conf.settings`` at call time, so tests can override any knob.
Names fixed by the design brief keep their brief names; project knobs are
prefixed ``CAO_``.
"""

import os
import re
import warnings
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from common import green
from services_registry import reference

BASE_DIR = Path(__file__).resolve().parent.parent

# A local .env (written by `make run` with a generated SECRET_KEY) fills in
# what the real environment does not set; the real environment always wins.
# CAO_ENV_FILE names another file; empty turns the file off.
_env_file = os.environ.get("CAO_ENV_FILE", str(BASE_DIR / ".env"))
if _env_file:
    load_dotenv(_env_file, override=False)


def env_str(name, default=""):
    """The variable's value; unset and empty both mean the default."""
    return os.environ.get(name) or default


def env_bool(name, default=False):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def _env_number(name, default, kind):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a {kind.__name__}, got {raw!r}") from None


def env_int(name, default):
    return _env_number(name, default, int)


def env_float(name, default):
    return _env_number(name, default, float)


def env_seconds(name, default, *, was=None, kind=float):
    """A duration in seconds (``CAO_*_S``); ``was`` is its deprecated name, still read when ``name`` is unset."""
    if was and os.environ.get(name, "").strip() == "" and os.environ.get(was, "").strip() != "":
        warnings.warn(f"{was} is deprecated and will be removed; set {name} instead.", FutureWarning, stacklevel=2)
        return _env_number(was, default, kind)
    return _env_number(name, default, kind)


def env_list(name, default):
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


# --- Core -------------------------------------------------------------------

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is required when DEBUG is off. Set SECRET_KEY to a long random "
            "string, or set DEBUG=true for local development."
        )
    SECRET_KEY = "insecure-local-development-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "corsheaders",
    "csp",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "django_dramatiq",
    "api_keys",
    "services_registry",
    "jobs",
    "webhooks",
    "orchestration",
    "simulator",
    "ops",
    # Admin login lockout (see AXES_* below).
    "axes",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "common.middleware.BodySizeLimitMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: turns a locked-out login into its 429.
    "axes.middleware.AxesMiddleware",
]

AUTHENTICATION_BACKENDS = [
    # Refuses logins of a locked-out username and address before checking the password.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "cao_project.urls"
ASGI_APPLICATION = "cao_project.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Backends ---------------------------------------------------------------

DATABASE_URL = env_str("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/cao")
DATABASES = {
    # Workers keep persistent connections: they run many short transactions
    # and a reconnect per message would dominate a step's cost. No health
    # check per message (a round trip each): a connection broken by a
    # PostgreSQL restart fails once, is closed, and the work is retried.
    "default": dj_database_url.parse(
        DATABASE_URL, conn_max_age=env_int("CAO_DB_CONN_MAX_AGE", 600), conn_health_checks=False
    ),
}
DATABASES["default"].setdefault("OPTIONS", {})["connect_timeout"] = env_int("CAO_DB_CONNECT_TIMEOUT_S", 5)
# A green worker (rundramatiq --use-gevent, common/green.py) shares this many
# connections between all its calls in flight, instead of one per thread.
CAO_WORKER_DB_CONNECTIONS = env_int("CAO_WORKER_DB_CONNECTIONS", 4)
if green.active():
    green.prepare()
    DATABASES["default"] = green.pooled_database(DATABASES["default"], max_connections=CAO_WORKER_DB_CONNECTIONS)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
# Processes refuse to start when PostgreSQL or Redis cannot be reached.
CAO_CHECK_BACKENDS_ON_START = env_bool("CAO_CHECK_BACKENDS_ON_START", True)
# Socket timeouts of the gateway's own Redis calls (leases, markers).
CAO_REDIS_TIMEOUT_S = env_float("CAO_REDIS_TIMEOUT_S", 5.0)
# The Dramatiq broker. Leases and the channel layer always use REDIS_URL.
BROKER_URL = env_str("BROKER_URL", REDIS_URL)

# /metrics: with a token set, scrapers send "Authorization: Bearer <token>";
# without one, only these client addresses may scrape.
CAO_METRICS_TOKEN = env_str("CAO_METRICS_TOKEN")
CAO_METRICS_ALLOWED_IPS = env_list("CAO_METRICS_ALLOWED_IPS", ["127.0.0.1", "::1"])
# Set (to a writable directory) when several processes serve metrics on one
# host; prometheus_client reads the same variable to write per-process files.
PROMETHEUS_MULTIPROC_DIR = env_str("PROMETHEUS_MULTIPROC_DIR") or None

# Connections a green worker keeps open per downstream host, shared by its greenlets.
CAO_HTTP_POOL_SIZE = env_int("CAO_HTTP_POOL_SIZE", 100)

# Threads serving HTTP requests in the API process (each keeps a DB connection).
CAO_HTTP_THREADS = env_int("CAO_HTTP_THREADS", 8)

# Django's cache, shared by every process (the throttle keeps its own keys).
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cao:cache",
    },
}

# Pub/sub: a push is one PUBLISH, and each API process holds one subscription
# per followed job, shared by its sockets and streams, read from one
# connection (channels-redis's list layer popped every message of every
# socket with two round trips). Pushes are the fast path; ``jobs.follow``
# reads the log for whatever a push misses (while Redis restarts, say).
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "cao:ws"},
    },
}

# Queues a service can be assigned to; one worker pool consumes each.
CAO_QUEUES = env_list("CAO_QUEUES", list(reference.QUEUES))

# A worker silent this long is presumed dead and its fetched-but-unfinished
# messages go back to their queue (maintenance sweeps for them every pass).
CAO_BROKER_HEARTBEAT_TIMEOUT_MS = env_int("CAO_BROKER_HEARTBEAT_TIMEOUT_MS", 60_000)

DRAMATIQ_MIDDLEWARE = [
    # Listed explicitly: django-dramatiq's defaults add RabbitMQ, Prometheus on
    # port 9191 and an admin middleware that writes a row per message.
    "dramatiq.middleware.AgeLimit",
    "dramatiq.middleware.TimeLimit",
    "dramatiq.middleware.Callbacks",
    "dramatiq.middleware.Retries",
    "django_dramatiq.middleware.DbConnectionsMiddleware",
    "orchestration.middleware.RequireBackends",
    "orchestration.middleware.AnnounceWorker",
    "orchestration.middleware.QuietIdleThreads",
]
if BROKER_URL.startswith(("amqp://", "amqps://")):
    # RabbitMQ pushes messages to consumers and returns a dead consumer's
    # unacknowledged ones by itself.
    DRAMATIQ_BROKER = {
        "BROKER": "dramatiq.brokers.rabbitmq.RabbitmqBroker",
        "OPTIONS": {"url": BROKER_URL},
        "MIDDLEWARE": DRAMATIQ_MIDDLEWARE,
    }
elif BROKER_URL.startswith(("redis://", "rediss://", "unix://")):
    DRAMATIQ_BROKER = {
        # Dramatiq's RedisBroker, with consumers woken by enqueues instead of polling.
        "BROKER": "orchestration.broker.NotifyingRedisBroker",
        "OPTIONS": {"url": BROKER_URL, "heartbeat_timeout": CAO_BROKER_HEARTBEAT_TIMEOUT_MS},
        "MIDDLEWARE": DRAMATIQ_MIDDLEWARE,
    }
else:
    raise ImproperlyConfigured(f"BROKER_URL must be a redis:// or amqp:// URL, got {BROKER_URL.split(':')[0]}://...")
DRAMATIQ_AUTODISCOVER_MODULES = ["actors"]

# --- Downstream services ----------------------------------------------------

INTERNAL_API_KEY = env_str("INTERNAL_API_KEY")
HTTP_CONNECT_TIMEOUT_S = env_float("HTTP_CONNECT_TIMEOUT_S", 3.0)
HTTP_READ_TIMEOUT_S = env_float("HTTP_READ_TIMEOUT_S", 30.0)
# A service's reply is read up to this many bytes and nested at most this
# deep; beyond either the attempt fails with MALFORMED_RESPONSE.
CAO_MAX_REPLY_BYTES = env_int("CAO_MAX_REPLY_BYTES", 8 * 1024 * 1024)
CAO_MAX_REPLY_DEPTH = env_int("CAO_MAX_REPLY_DEPTH", 64)
# Per-check timeout of GET /api/v1/health/services (checks run concurrently).
CAO_HEALTH_TIMEOUT_S = env_float("CAO_HEALTH_TIMEOUT_S", 2.0)

# `<SERVICE_NAME>_URL` overrides the stored base_url of the service named
# service_name (e.g. FAST_CHAT_LLM_URL for fast_chat_llm). Collected here so
# the rest of the code never reads the environment.
_NOT_SERVICE_URLS = {"DATABASE_URL", "REDIS_URL", "BROKER_URL"}
CAO_SERVICE_URL_OVERRIDES = {
    name[: -len("_URL")].lower(): value
    for name, value in os.environ.items()
    if name.endswith("_URL")
    and name not in _NOT_SERVICE_URLS
    and re.fullmatch(r"[A-Z][A-Z0-9_]*_URL", name)
    and value.strip()
}

# --- Jobs and maintenance ---------------------------------------------------

# Hot paths (steps, job creation) read services and recipes at most this old.
CAO_REGISTRY_CACHE_S = env_seconds("CAO_REGISTRY_CACHE_S", 1.0, was="CAO_REGISTRY_CACHE_SECONDS")
# How long a process trusts an API key it has authenticated before reading
# its row again: a key deactivated or deleted stops working within this
# time in every process (at once in the one that changed it). 0: every request.
CAO_API_KEY_CACHE_S = env_seconds("CAO_API_KEY_CACHE_S", 5.0, was="CAO_API_KEY_CACHE_SECONDS")

# Retries of a failed step: exponential backoff with jitter, from base to cap.
CAO_RETRY_BASE_DELAY_S = env_float("CAO_RETRY_BASE_DELAY_S", 1.0)
CAO_RETRY_MAX_DELAY_S = env_float("CAO_RETRY_MAX_DELAY_S", 60.0)
# The window a service's requests_per_minute is counted over: a minute (tests shorten it).
CAO_RATE_WINDOW_S = env_seconds("CAO_RATE_WINDOW_S", 60.0)
# Priority with aging, within one API key's share of a busy service: a job
# waiting for a slot goes as if it had arrived priority * this many seconds
# earlier, so one point of priority is worth this much waiting.
CAO_PRIORITY_AGING_S = env_seconds("CAO_PRIORITY_AGING_S", 10.0)
# A process holding slots says it is alive this often; one silent for
# CAO_WORKER_DEAD_AFTER_S is presumed dead: its slots are reclaimed and its
# steps re-run at once (a stall that long costs a duplicate call).
CAO_WORKER_HEARTBEAT_S = env_float("CAO_WORKER_HEARTBEAT_S", 1.0)
CAO_WORKER_DEAD_AFTER_S = env_float("CAO_WORKER_DEAD_AFTER_S", 5.0)
# The scheduler checks for dead processes and Redis restarts this often.
CAO_RECOVERY_TICK_S = env_float("CAO_RECOVERY_TICK_S", 1.0)
# How long a freed slot stays reserved for the waiter it was handed to.
CAO_HANDOFF_TTL_S = env_float("CAO_HANDOFF_TTL_S", 30.0)
# Maintenance re-sends a step whose message, place in line or lease vanished
# (e.g. Redis restarted) once it has been missing for this long.
CAO_REDISPATCH_GRACE_S = env_seconds("CAO_REDISPATCH_GRACE_S", 30.0, was="CAO_REDISPATCH_GRACE_SECONDS")
# A sent step message is presumed lost after this long in the broker.
CAO_DISPATCH_MARKER_TTL_S = env_seconds("CAO_DISPATCH_MARKER_TTL_S", 900.0, was="CAO_DISPATCH_MARKER_TTL_SECONDS")
# How often a step message is retried while PostgreSQL or Redis is down.
CAO_INFRA_MAX_RETRIES = env_int("CAO_INFRA_MAX_RETRIES", 60)
# How long a worker keeps retrying to record a finished call while PostgreSQL is down.
CAO_RECORD_RETRY_S = env_seconds("CAO_RECORD_RETRY_S", 300.0, was="CAO_RECORD_RETRY_SECONDS")
# Whether downstream calls honour HTTP(S)_PROXY / NO_PROXY and .netrc.
CAO_HTTP_TRUST_ENV = env_bool("CAO_HTTP_TRUST_ENV", False)

# --- Webhooks (the webhooks app) ------------------------------------------------

# The queue of the delivery actor; its own worker pool consumes it, so a slow
# receiver never holds a step worker or a service's slot.
CAO_WEBHOOK_QUEUE = env_str("CAO_WEBHOOK_QUEUE", "webhooks")
# Loopback, link-local and private addresses are refused as webhook targets,
# at create and at every delivery (against the resolved address), except the
# hosts listed here: names (as written in the URL), addresses or networks
# (e.g. "localhost,127.0.0.1,10.0.0.0/8").
CAO_WEBHOOK_ALLOWED_HOSTS = env_list("CAO_WEBHOOK_ALLOWED_HOSTS", [])
# A failed delivery is retried after about this long, doubling each time
# (with jitter) up to CAO_WEBHOOK_RETRY_MAX_DELAY_S, for CAO_WEBHOOK_RETRY_FOR_S.
CAO_WEBHOOK_RETRY_BASE_S = env_seconds("CAO_WEBHOOK_RETRY_BASE_S", 5.0)
CAO_WEBHOOK_RETRY_MAX_DELAY_S = env_seconds("CAO_WEBHOOK_RETRY_MAX_DELAY_S", 3600.0)
CAO_WEBHOOK_RETRY_FOR_S = env_seconds("CAO_WEBHOOK_RETRY_FOR_S", 24 * 3600.0)
# One delivery's request: connect and read timeouts (the whole answer must
# start within the read timeout).
CAO_WEBHOOK_CONNECT_TIMEOUT_S = env_seconds("CAO_WEBHOOK_CONNECT_TIMEOUT_S", 3.0)
CAO_WEBHOOK_TIMEOUT_S = env_seconds("CAO_WEBHOOK_TIMEOUT_S", 10.0)
# After a key's signing secret is rotated, the previous one still signs
# (a second signature in webhook-signature) for this long.
CAO_WEBHOOK_SECRET_GRACE_S = env_seconds("CAO_WEBHOOK_SECRET_GRACE_S", 24 * 3600.0)
# The longest webhook_url accepted.
CAO_WEBHOOK_MAX_URL_LENGTH = env_int("CAO_WEBHOOK_MAX_URL_LENGTH", 2000)

JOB_STUCK_SECONDS = env_int("JOB_STUCK_SECONDS", 7200)
SANITY_CHECK_INTERVAL_SECONDS = env_float("SANITY_CHECK_INTERVAL_SECONDS", 60.0)

# --- API ----------------------------------------------------------------------

# Lets requests without an API key in (as one shared anonymous client). For
# local development only; off by default.
CAO_ALLOW_ANONYMOUS = env_bool("CAO_ALLOW_ANONYMOUS", False)
# An open WebSocket or event stream re-reads its job's event log this often
# while the job is active (pushes are the fast path; this recovers a lost
# one). 0 turns it off.
CAO_WS_RESYNC_S = env_seconds("CAO_WS_RESYNC_S", 5.0, was="CAO_WS_RESYNC_SECONDS")
# A push to the channel layer taking longer is abandoned and the connection
# made afresh (subscribers read what it carried from the log).
CAO_PUSH_TIMEOUT_S = env_seconds("CAO_PUSH_TIMEOUT_S", 2.0)
# A pushed event that overtook an earlier one (pushed by another worker) waits
# this long for it before the gap is read from the log; 0 reads it at once.
CAO_FOLLOW_REORDER_WAIT_S = env_seconds("CAO_FOLLOW_REORDER_WAIT_S", 0.2)
# Threads (each with its database connection) that run the reads of an API
# process's sockets and streams side by side: authentication, the job, the log.
CAO_LIVE_READ_THREADS = env_int("CAO_LIVE_READ_THREADS", 4)
# An event stream (GET /api/v1/jobs/<id>/stream) silent this long sends a
# comment line, so proxies keep it open and clients see it alive. 0: never.
CAO_SSE_KEEPALIVE_S = env_seconds("CAO_SSE_KEEPALIVE_S", 15.0, was="CAO_SSE_KEEPALIVE_SECONDS")
# Lifetime of the signed token in monitor_url.
CAO_MONITOR_TOKEN_MAX_AGE_S = env_int("CAO_MONITOR_TOKEN_MAX_AGE_S", 24 * 3600)
# Request limits. Bodies over CAO_MAX_BODY_BYTES get 413; input_data is
# limited in encoded size and nesting depth (400).
CAO_MAX_BODY_BYTES = env_int("CAO_MAX_BODY_BYTES", 256 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = CAO_MAX_BODY_BYTES
CAO_MAX_INPUT_BYTES = env_int("CAO_MAX_INPUT_BYTES", 64 * 1024)
# The furthest deadline a job may be given (deadline_s, deadline_at): a week.
CAO_MAX_DEADLINE_S = env_seconds("CAO_MAX_DEADLINE_S", 7 * 24 * 3600)
# A request's line and headers together; beyond, 431 before the app runs
# (common.http_protocol, the API server's HTTP protocol).
CAO_MAX_HEADER_BYTES = env_int("CAO_MAX_HEADER_BYTES", 64 * 1024)
CAO_MAX_INPUT_DEPTH = env_int("CAO_MAX_INPUT_DEPTH", 32)
# Requests per client (API key, else staff user, else IP), DRF rate syntax
# ("600/min"); "none" turns a limit off. Job creation has its own, lower one.
CAO_THROTTLE_RATES = {
    "client": env_str("CAO_THROTTLE_RATE", "1200/min"),
    "job_create": env_str("CAO_JOB_CREATE_THROTTLE_RATE", "300/min"),
}
for _name, _rate in CAO_THROTTLE_RATES.items():
    if not re.fullmatch(r"(?i)none|[1-9][0-9]*/(s|sec|second|m|min|minute|h|hour|d|day)", _rate.strip()):
        raise ImproperlyConfigured(
            f"The {_name} throttle rate must look like 600/min (per s, min, h or day) or none, got {_rate!r}"
        )
# Browsers on these origins may call the API (CORS); none by default. The
# admin and web pages are same-origin only.
CORS_ALLOWED_ORIGINS = env_list("CAO_CORS_ALLOWED_ORIGINS", [])
CORS_URLS_REGEX = r"^/api/.*$"
CORS_ALLOW_HEADERS = ["accept", "authorization", "content-type", "idempotency-key", "x-api-key"]
# Cookies and HSTS for deployments behind TLS.
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("CAO_SECURE_COOKIES", False)
SECURE_HSTS_SECONDS = env_seconds("CAO_HSTS_S", 0, was="CAO_HSTS_SECONDS", kind=int)
SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Lax"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
# Content-Security-Policy of HTML pages (django-csp): our pages load only
# their own scripts and styles, and connect (fetch and WebSocket) only to
# their own origin: in CSP Level 3, 'self' covers ws:// and wss:// of the
# page's own host and port.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'", "'unsafe-inline'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "frame-ancestors": ["'none'"],
        "form-action": ["'self'"],
        "base-uri": ["'self'"],
    },
}

# Admin logins (django-axes): after CAO_LOGIN_FAILURE_LIMIT failures for one
# username from one address, that pair gets 429 for CAO_LOGIN_COOLOFF_MINUTES,
# the right password included; a success resets the count. Attempts are
# rows in PostgreSQL, listed (and deletable, to unlock) in the admin.
AXES_FAILURE_LIMIT = env_int("CAO_LOGIN_FAILURE_LIMIT", 5)
# No banner at every process start: log lines are for events.
AXES_VERBOSE = False
AXES_COOLOFF_TIME = timedelta(minutes=env_float("CAO_LOGIN_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True

# Behind a TLS-terminating proxy that sets X-Forwarded-Proto, monitor_url uses wss://.
if env_bool("CAO_TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "common.api_errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["common.parsers.SafeJSONParser"],
    "DEFAULT_THROTTLE_CLASSES": ["api_keys.throttling.ClientRateThrottle"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api_keys.authentication.ApiKeyAuthentication",
        # Staff browsing the web pages call the API with their session (CSRF-checked).
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["api_keys.authentication.IsApiClient"],
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "CAO Gateway API",
    "DESCRIPTION": (
        "Orchestration gateway for multi-step AI workflows: start a feature (recipe), "
        "watch its steps run under per-service concurrency limits, resume or cancel it."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        # The event stream is an async view the generator cannot see; before
        # the error responses, which then add the statuses it shares.
        "jobs.stream_schema.add_job_stream",
        "common.openapi.add_error_responses",
    ],
}

# --- Static files, i18n, logging --------------------------------------------

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Lets `make run` serve the admin and docs assets straight from the apps.
WHITENOISE_USE_FINDERS = True

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

LOG_LEVEL = env_str("LOG_LEVEL", "INFO").upper()
# "readable" (default) or "json" (one object per line, for log shippers).
LOG_FORMAT = env_str("LOG_FORMAT", "readable").lower()
if LOG_FORMAT not in ("readable", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT must be 'readable' or 'json', got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        # Every line about a job carries job_id, step_index, service and attempt.
        "job_context": {"()": "common.logs.JobContextFilter"},
        "redact_secrets": {"()": "common.logs.RedactSecretsFilter"},
    },
    "formatters": {
        "readable": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s%(job_fields)s"},
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s %(message)s %(job_id)s %(step_index)s %(service)s %(attempt)s",
            "rename_fields": {"asctime": "timestamp", "levelname": "level", "name": "logger"},
        },
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["job_context", "redact_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
    },
}
