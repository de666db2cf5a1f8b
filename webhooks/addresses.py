"""Where a webhook may go: http(s) URLs whose addresses are public, unless CAO_WEBHOOK_ALLOWED_HOSTS lists them.

Checked twice. At create, the URL's shape, and its addresses when the host
resolves (an unresolvable name is accepted: delivery checks again). At
every delivery, against what the name resolves to then (DNS rebinding):
every address is checked, and the request connects to the address that was
checked (``resolve``), so a second resolution cannot swap it.
"""

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from webhooks.errors import InvalidWebhook, WebhookAddressNotAllowed

SCHEMES = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """A webhook URL taken apart: where to connect and what to ask for."""

    scheme: str
    host: str  # lower case, without brackets
    port: int
    path: str  # path and query, as sent in the request line
    host_header: str


def parse(url):
    """The ``Target`` of ``url``; InvalidWebhook when it is not an absolute http(s) URL."""
    if not isinstance(url, str) or not url:
        raise InvalidWebhook("webhook_url must be a URL.", details={"webhook_url": "expected a URL"})
    limit = settings.CAO_WEBHOOK_MAX_URL_LENGTH
    if len(url) > limit:
        raise InvalidWebhook(
            f"webhook_url is {len(url)} characters; the limit is {limit}.", details={"webhook_url": "too long"}
        )
    if not url.isascii() or not url.isprintable() or any(char.isspace() for char in url):
        raise InvalidWebhook(
            "webhook_url must be printable ASCII without spaces (encode other characters).",
            details={"webhook_url": "invalid characters"},
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        host = parts.hostname
    except ValueError:
        raise InvalidWebhook("webhook_url is not a valid URL.", details={"webhook_url": "invalid URL"}) from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise InvalidWebhook(
            f"webhook_url must be an http or https URL, not {scheme or 'one without a scheme'}.",
            details={"webhook_url": "scheme must be http or https"},
        )
    if not host:
        raise InvalidWebhook("webhook_url has no host.", details={"webhook_url": "no host"})
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhook(
            "webhook_url must not carry credentials; the signature authenticates the gateway.",
            details={"webhook_url": "credentials in URL"},
        )
    if parts.fragment:
        raise InvalidWebhook("webhook_url must not have a fragment.", details={"webhook_url": "fragment"})
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    default_port = SCHEMES[scheme]
    return Target(
        scheme=scheme,
        host=host.lower(),
        port=port or default_port,
        path=path,
        host_header=parts.netloc.rsplit("@", 1)[-1],
    )


def check_at_create(url, *, resolver=socket.getaddrinfo):
    """The URL, checked: its shape, and its addresses where they are known now."""
    target = parse(url)
    literal = _ip(target.host)
    if literal is not None:
        _check_addresses(target, [literal])
    elif target.host == "localhost" or target.host.endswith(".localhost"):
        _check_addresses(target, [ipaddress.ip_address("127.0.0.1")])
    else:
        try:
            addresses = _addresses(target, resolver)
        except OSError:
            addresses = []  # not resolvable now: each delivery resolves and checks it
        _check_addresses(target, addresses)
    return url


def resolve(target, *, resolver=socket.getaddrinfo):
    """The address to connect to for ``target``: every address the host resolves to must be allowed.

    Raises WebhookAddressNotAllowed, or OSError when the name does not resolve.
    """
    literal = _ip(target.host)
    addresses = [literal] if literal is not None else _addresses(target, resolver)
    if not addresses:
        raise OSError(f"{target.host} resolves to no address")
    _check_addresses(target, addresses)
    return str(addresses[0])


def refused(address, *, host, allowed=None):
    """Whether ``address`` (an ip_address) may not be reached for ``host``: not public, and not allowed."""
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    if address.is_global and not address.is_multicast:
        return False
    return not _allowed(address, host=host, allowed=settings.CAO_WEBHOOK_ALLOWED_HOSTS if allowed is None else allowed)


def _allowed(address, *, host, allowed):
    for entry in allowed:
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == host:
            return True
        try:
            if address in ipaddress.ip_network(entry.strip("[]"), strict=False):
                return True
        except ValueError:
            continue  # a host name, and not this one
    return False


def _check_addresses(target, addresses):
    for address in addresses:
        if refused(address, host=target.host):
            raise WebhookAddressNotAllowed(
                f"webhook_url's host {target.host} is (or resolves to) {address}, a loopback, link-local or "
                "private address; an operator can allow it with CAO_WEBHOOK_ALLOWED_HOSTS.",
                details={"webhook_url": "address not allowed", "address": str(address)},
            )


def _addresses(target, resolver):
    infos = resolver(target.host, target.port, type=socket.SOCK_STREAM)
    seen = []
    for _family, _type, _proto, _canonname, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if address not in seen:
            seen.append(address)
    return seen


def _ip(host):
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
