"""API keys: how clients authenticate. Only a hash of each key is stored."""

import base64
import hashlib
import hmac
import secrets

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

KEY_PREFIX_LENGTH = 8
MAX_SHARE_WEIGHT = 100
MAX_CALLS_PER_SERVICE = 100_000
MAX_CONCURRENT_JOBS = 100_000

# The owner of jobs created without a key (CAO_ALLOW_ANONYMOUS), so they are
# kept apart from the jobs of staff sessions, which have no owner. No raw key
# matches it: generated prefixes are hex, and its hash is no SHA-256 digest.
ANONYMOUS_PREFIX = "anon0000"
UNUSABLE_HASH = "!"


# Webhook signing secrets in the Standard Webhooks format: "whsec_" and the
# base64 of random bytes (24 bytes, as the spec's libraries generate them).
WEBHOOK_SECRET_PREFIX = "whsec_"
WEBHOOK_SECRET_BYTES = 24


def new_webhook_secret():
    """A fresh signing secret, ``whsec_<base64 of random bytes>``."""
    return WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(WEBHOOK_SECRET_BYTES)).decode()


def hash_key(key):
    # Keys are 256-bit random strings, so a fast hash is enough: there is no
    # dictionary to attack, unlike passwords.
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeyManager(models.Manager):
    def create_key(self, *, name, is_staff=False):
        """Create a key; returns ``(api_key, raw_key)``. The raw key is never stored."""
        api_key = self.model(name=name, is_staff=is_staff)
        raw_key = api_key.set_new_key()
        api_key.save()
        return api_key, raw_key

    def anonymous(self):
        """The key that owns the jobs of anonymous clients (created on first use)."""
        api_key, _ = self.get_or_create(
            prefix=ANONYMOUS_PREFIX,
            defaults={"name": "anonymous clients (CAO_ALLOW_ANONYMOUS)", "key_hash": UNUSABLE_HASH},
        )
        return api_key


class ApiKey(models.Model):
    """A client credential. Jobs created with a key belong to it."""

    name = models.CharField(max_length=100, help_text="Who or what uses this key.")
    prefix = models.CharField(max_length=KEY_PREFIX_LENGTH, unique=True, editable=False)
    key_hash = models.CharField(max_length=64, editable=False)
    is_staff = models.BooleanField(
        default=False, help_text="Staff keys see every job and may force-resume."
    )
    is_active = models.BooleanField(default=True)
    share_weight = models.PositiveSmallIntegerField(
        default=1,
        db_default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_SHARE_WEIGHT)],
        help_text=(
            "This key's share of each busy service's turns, against the other keys' "
            f"(1-{MAX_SHARE_WEIGHT}): with 2, its jobs are served twice as often as a key with 1."
        ),
    )
    max_calls_per_service = models.PositiveIntegerField(
        default=0,
        db_default=0,
        validators=[MaxValueValidator(MAX_CALLS_PER_SERVICE)],
        help_text="At most this many of this key's jobs in a call to any one service at once; the rest wait "
        "in that service's line and let other keys' jobs pass. 0: no cap.",
    )
    max_concurrent_jobs = models.PositiveIntegerField(
        default=0,
        db_default=0,
        validators=[MaxValueValidator(MAX_CONCURRENT_JOBS)],
        help_text="At most this many of this key's jobs run at once; the next ones wait (step state HELD) and "
        "start, by priority, as running ones end. 0: no cap.",
    )
    # Signs this key's webhook deliveries. Rotating it keeps the previous one
    # signing too until previous_webhook_secret_until (a grace period).
    webhook_secret = models.CharField(max_length=64, default=new_webhook_secret, editable=False)
    previous_webhook_secret = models.CharField(max_length=64, blank=True, default="", editable=False)
    previous_webhook_secret_until = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)

    objects = ApiKeyManager()

    class Meta:
        ordering = ["name"]
        verbose_name = "API key"

    def __str__(self):
        return f"{self.name} (cao_{self.prefix}_…)"

    # DRF stores the authenticated principal as request.user.
    is_authenticated = True
    is_anonymous = False

    def set_new_key(self):
        """Give this (unsaved) key a fresh secret; returns the raw key, which is not stored."""
        self.prefix = secrets.token_hex(KEY_PREFIX_LENGTH // 2)
        raw_key = f"cao_{self.prefix}_{secrets.token_urlsafe(32)}"
        self.key_hash = hash_key(raw_key)
        return raw_key

    def matches(self, raw_key):
        return hmac.compare_digest(self.key_hash, hash_key(raw_key))

    @staticmethod
    def prefix_of(raw_key):
        """The lookup prefix of a raw key, or None when it has the wrong shape."""
        parts = raw_key.split("_", 2)
        if len(parts) != 3 or parts[0] != "cao" or len(parts[1]) != KEY_PREFIX_LENGTH:
            return None
        return parts[1]
