"""The registry: downstream AI services and the recipes (features) that chain them.

Validation lives here (``clean`` and database constraints) so the admin, the
API and data migrations all refuse the same things with the same messages.
"""

import ipaddress
import re
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models


_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def validate_base_url(value):
    """An http(s) URL; unlike URLValidator, single-label hosts (Docker service names) are fine."""
    parts = urlsplit(value)
    try:
        port = parts.port
    except ValueError:
        port = -1
    host = parts.hostname or ""
    is_ip = True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        is_ip = False
    if (
        parts.scheme not in ("http", "https")
        or not (is_ip or _HOSTNAME.match(host))
        or port == -1
        or parts.query
        or parts.fragment
        or parts.username
    ):
        raise ValidationError(
            f"Enter an http(s) URL such as http://fast-chat:9000 or https://llm.example.com/api (got {value!r})."
        )


class AuthType(models.TextChoices):
    NONE = "none", "No authentication"
    API_KEY_HEADER = "api_key_header", "API key in a header"
    BEARER = "bearer", "Bearer token"


class Service(models.Model):
    """A downstream AI service, called with one HTTP POST per job step."""

    name = models.SlugField(
        max_length=64,
        unique=True,
        help_text="Stable identifier, e.g. fast_chat_llm. Its URL can be overridden by the "
        "environment variable NAME_URL (e.g. FAST_CHAT_LLM_URL).",
    )
    queue = models.CharField(
        max_length=32,
        help_text="The worker queue whose workers call this service (one of CAO_QUEUES).",
    )
    concurrency_limit = models.PositiveIntegerField(
        validators=[MinValueValidator(1)],
        help_text="At most this many calls in flight at once, across every worker.",
    )
    timeout_s = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.001)],
        help_text="Read timeout of one call, in seconds. Blank: HTTP_READ_TIMEOUT_S.",
    )
    lease_ttl_s = models.FloatField(
        help_text="How long a crashed caller keeps its slot, in seconds. Must exceed the timeout.",
    )
    max_attempts = models.PositiveIntegerField(
        validators=[MinValueValidator(1)],
        help_text="Attempts per step before the job fails (retryable) and waits for a resume.",
    )
    requests_per_minute = models.PositiveIntegerField(
        default=0,
        help_text="At most this many calls start per minute, across every worker (a sliding window). "
        "0: no such limit.",
    )
    tokens_per_minute = models.PositiveIntegerField(
        default=0,
        help_text="At most this many tokens per minute, across every worker, as replies report them in "
        "'metrics' (tokens_used, total_tokens, input_tokens + output_tokens, prompt_tokens + completion_tokens, "
        "or those under 'usage'). 0: no such limit.",
    )
    tokens_per_call = models.PositiveIntegerField(
        default=1000,
        validators=[MinValueValidator(1)],
        help_text="What a call counts for against tokens_per_minute until its reply says what it used "
        "(a reply that does not say keeps it).",
    )
    breaker_threshold = models.PositiveIntegerField(
        default=0,
        help_text="Consecutive failed calls (5xx, 429, timeouts, unreachable, malformed replies) that open the "
        "circuit: no call starts until one probe call succeeds. 0: no circuit breaker.",
    )
    breaker_open_s = models.FloatField(
        default=30.0,
        validators=[MinValueValidator(0.1)],
        help_text="Seconds an open circuit refuses calls before it lets one probe call through.",
    )
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="Where the service lives; the environment variable NAME_URL overrides it.",
    )
    execute_path = models.CharField(max_length=200, default="/v1/execute")
    health_path = models.CharField(max_length=200, default="/health")
    auth_type = models.CharField(max_length=20, choices=AuthType.choices, default=AuthType.NONE)
    auth_header_name = models.CharField(
        max_length=100,
        default="X-API-Key",
        help_text="Header that carries INTERNAL_API_KEY when auth type is 'API key in a header'.",
    )
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(concurrency_limit__gte=1), name="service_limit_at_least_one"
            ),
            models.CheckConstraint(
                condition=models.Q(timeout_s__isnull=True) | models.Q(timeout_s__gt=0),
                name="service_timeout_positive",
            ),
            models.CheckConstraint(
                condition=models.Q(timeout_s__isnull=True) | models.Q(lease_ttl_s__gt=models.F("timeout_s")),
                name="service_lease_ttl_exceeds_timeout",
            ),
            models.CheckConstraint(
                condition=models.Q(max_attempts__gte=1), name="service_attempts_at_least_one"
            ),
            models.CheckConstraint(
                condition=models.Q(breaker_open_s__gte=0.1), name="service_breaker_open_at_least_a_tenth"
            ),
        ]

    def __str__(self):
        return self.name

    def clean(self):
        errors = {}
        queues = list(settings.CAO_QUEUES)
        if self.queue not in queues:
            errors["queue"] = f"Unknown queue {self.queue!r}: choose one of {', '.join(queues)}."
        if self.lease_ttl_s is not None and self.lease_ttl_s <= self.effective_timeout_s:
            source = "the timeout" if self.timeout_s is not None else "HTTP_READ_TIMEOUT_S"
            errors["lease_ttl_s"] = (
                f"Lease TTL ({self.lease_ttl_s:g}s) must be greater than {source} "
                f"({self.effective_timeout_s:g}s), or a live call could lose its slot."
            )
        for field in ("execute_path", "health_path"):
            value = getattr(self, field)
            if value and not value.startswith("/"):
                errors[field] = f"The path must start with '/', e.g. /{value}."
        if self.auth_type == AuthType.API_KEY_HEADER and not self.auth_header_name.strip():
            errors["auth_header_name"] = "Name the header that carries the key, e.g. X-API-Key."
        if errors:
            raise ValidationError(errors)

    @property
    def effective_timeout_s(self):
        """The read timeout of a call: the service's own, else HTTP_READ_TIMEOUT_S."""
        return self.timeout_s if self.timeout_s is not None else settings.HTTP_READ_TIMEOUT_S

    @property
    def url_env_var(self):
        """The environment variable that overrides ``base_url``."""
        return f"{self.name.upper()}_URL"

    @property
    def url_override(self):
        """The base URL set by the environment, or None."""
        return settings.CAO_SERVICE_URL_OVERRIDES.get(self.name)

    @property
    def effective_base_url(self):
        """The base URL calls go to: the environment override wins over the stored one."""
        return (self.url_override or self.base_url).rstrip("/")

    @property
    def execute_url(self):
        return self.effective_base_url + self.execute_path

    @property
    def health_url(self):
        return self.effective_base_url + self.health_path


class Recipe(models.Model):
    """A feature: an ordered list of steps, each one call to a service."""

    name = models.SlugField(max_length=64, unique=True, help_text="The feature_name clients ask for.")
    description = models.TextField(blank=True)
    enabled = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @staticmethod
    def validate_steps(services):
        """Refuse a step list that cannot run; ``services`` in step order."""
        if not services:
            raise ValidationError("A recipe needs at least one step: add a service.")
        disabled = sorted({service.name for service in services if not service.enabled})
        if disabled:
            raise ValidationError(
                f"Steps use disabled services ({', '.join(disabled)}): enable them or pick others."
            )

    def clean(self):
        # Only meaningful for a stored recipe; the admin validates unsaved steps
        # through its inline formset, which calls validate_steps as well.
        if self.pk and self.enabled:
            self.validate_steps([step.service for step in self.steps.select_related("service")])


class RecipeStep(models.Model):
    """One step of a recipe: call ``service`` at ``position`` (0-based order)."""

    recipe = models.ForeignKey(Recipe, related_name="steps", on_delete=models.CASCADE)
    position = models.PositiveIntegerField(help_text="Steps run in ascending position order; gaps are allowed.")
    service = models.ForeignKey(Service, related_name="recipe_steps", on_delete=models.PROTECT)

    class Meta:
        ordering = ["recipe", "position"]
        constraints = [
            models.UniqueConstraint(fields=["recipe", "position"], name="recipe_step_position_unique"),
        ]

    def __str__(self):
        return f"{self.recipe.name}[{self.position}] {self.service.name}"
