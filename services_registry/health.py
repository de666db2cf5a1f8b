"""Concurrent health checks of downstream services."""

import time
from concurrent.futures import ThreadPoolExecutor

import requests


def check_service(service, *, timeout_s, session=None):
    """GET the service's health URL once; never raises.

    Returns ``{"ok", "status_code" | "error", "latency_ms"}``.
    """
    http = session or requests
    started = time.perf_counter()
    try:
        response = http.get(service.health_url, timeout=(timeout_s, timeout_s), allow_redirects=False)
    except requests.Timeout:
        result = {"ok": False, "error": f"timed out after {timeout_s:g}s"}
    except requests.ConnectionError as exc:
        result = {"ok": False, "error": f"connection failed: {describe_request_error(exc)}"}
    except requests.RequestException as exc:
        result = {"ok": False, "error": f"request failed: {describe_request_error(exc)}"}
    else:
        response.close()
        result = {"ok": 200 <= response.status_code < 300, "status_code": response.status_code}
    result["latency_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return result


def check_services(services, *, timeout_s):
    """Check every service at once; answers within about one timeout.

    Returns ``{service name: result}`` in the order given.
    """
    services = list(services)
    if not services:
        return {}
    with ThreadPoolExecutor(max_workers=len(services), thread_name_prefix="health") as pool:
        futures = [pool.submit(check_service, service, timeout_s=timeout_s) for service in services]
        return {service.name: future.result() for service, future in zip(services, futures)}


def describe_request_error(exc):
    """A short reason for a failed ``requests`` call, without the URL-laden wrapper text."""
    reason = exc.args[0] if exc.args else exc
    reason = getattr(reason, "reason", reason)  # urllib3's MaxRetryError wraps the cause
    # urllib3 prefixes the connection object's repr; keep the operating system's words.
    return str(reason).rsplit(": ", 1)[-1]
