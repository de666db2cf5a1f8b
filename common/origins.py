"""Whether a browser page may use this site's session cookie: the rule of Django's CSRF origin check.

A cookie is sent with a request to its host whatever the port or scheme of
the page that makes it, so a page on ``http://localhost:9999`` carries the
session of ``http://localhost:8000``. Only the full origin (scheme, host and
port) tells them apart. WebSocket handshakes get no CSRF check from Django;
the consumer asks ``scope_origin_allowed`` instead.
"""

from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain


def origin_allowed(origin, *, host, secure):
    """Whether a page at ``origin`` may act with the session on a request to ``host`` (over TLS if ``secure``).

    As ``django.middleware.csrf.CsrfViewMiddleware``: the origin is the
    request's own (same scheme, host and port, the host being one of
    ALLOWED_HOSTS), or listed in CSRF_TRUSTED_ORIGINS (``https://*.example.com``
    allows subdomains).
    """
    if not origin or origin == "null":
        return False
    domain, _ = split_domain_port(host or "")
    if domain and validate_host(domain, settings.ALLOWED_HOSTS):
        if origin == f"{'https' if secure else 'http'}://{host}":
            return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(
        is_same_domain(parsed.netloc, trusted_origin.netloc.lstrip("*"))
        for trusted_origin in (urlsplit(entry) for entry in trusted if "*" in entry)
        if trusted_origin.scheme == parsed.scheme
    )


def scope_origin_allowed(scope):
    """``origin_allowed`` for an ASGI scope (a WebSocket handshake): its Origin and Host headers and scheme."""
    headers = {name.decode("latin1"): value.decode("latin1") for name, value in scope.get("headers", [])}
    secure = scope.get("scheme") in ("https", "wss")
    # Behind a TLS proxy (CAO_TRUST_X_FORWARDED_PROTO), as request.is_secure() reads it.
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        forwarded = headers.get(meta_name.removeprefix("HTTP_").replace("_", "-").lower())
        if forwarded is not None:
            secure = forwarded.split(",", 1)[0].strip() == secure_value
    return origin_allowed(headers.get("origin", ""), host=headers.get("host", ""), secure=secure)
