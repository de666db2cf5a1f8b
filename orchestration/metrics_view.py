"""``/metrics``: Prometheus text for this host's processes, plus shared state read at scrape time."""

import hmac
import logging

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from common.errors import error_body
from orchestration.per_process import get_limiter
from orchestration.queues import queue_depths
from services_registry.selectors import service_list
from webhooks.selectors import pending_summary

logger = logging.getLogger(__name__)


class SharedStateCollector:
    """Slots in use, limits, waiters, cool-downs, circuits and rate budgets per service; queue depth per queue."""

    def collect(self):
        in_use = GaugeMetricFamily("cao_slots_in_use", "Slots held or reserved, per service.", labels=["service"])
        limit = GaugeMetricFamily("cao_slot_limit", "Concurrency limit, per service.", labels=["service"])
        waiters = GaugeMetricFamily("cao_slot_waiters", "Steps waiting for a slot, per service.", labels=["service"])
        depth = GaugeMetricFamily(
            "cao_queue_depth", "Messages not yet picked up, per queue (the step queues and the webhooks queue).", labels=["queue", "kind"]
        )
        rate = GaugeMetricFamily(
            "cao_service_calls_in_rate_window",
            "Calls started in the current window of a service's requests_per_minute budget.",
            labels=["service"],
        )
        rate_limit = GaugeMetricFamily(
            "cao_service_requests_per_minute", "A service's requests_per_minute budget (0: none).", labels=["service"],
        )
        tokens = GaugeMetricFamily(
            "cao_service_tokens_in_rate_window",
            "Tokens the calls of the current window count for against a service's tokens_per_minute "
            "(estimates until their replies say).",
            labels=["service"],
        )
        tokens_limit = GaugeMetricFamily(
            "cao_service_tokens_per_minute", "A service's tokens_per_minute budget (0: none).", labels=["service"],
        )
        circuit = GaugeMetricFamily(
            "cao_service_circuit_open",
            "1 while a service's circuit breaker is open or waits for its probe call, else 0.",
            labels=["service"],
        )
        cooling = GaugeMetricFamily(
            "cao_service_cool_down_seconds",
            "Seconds left of a service's cool-down (it answered 429/503 with Retry-After); 0 when none.",
            labels=["service"],
        )
        pending = GaugeMetricFamily("cao_webhook_pending", "Webhook deliveries still to be made (or retried).")
        oldest = GaugeMetricFamily(
            "cao_webhook_oldest_pending_age_seconds",
            "Age of the oldest webhook delivery still to be made; 0 when none.",
        )
        try:
            count, oldest_at = pending_summary()
            pending.add_metric([], count)
            oldest.add_metric([], max(0.0, (timezone.now() - oldest_at).total_seconds()) if oldest_at else 0.0)
        except Exception:
            logger.warning("Could not read the webhook outbox for /metrics.", exc_info=True)
        yield from (pending, oldest)
        try:
            limiter = get_limiter()
            for service in service_list():
                occupancy = limiter.occupancy(service.name)
                in_use.add_metric([service.name], occupancy.in_use)
                waiters.add_metric([service.name], occupancy.waiting)
                limit.add_metric([service.name], service.concurrency_limit)
                left_s = max(0.0, occupancy.cooling_until - occupancy.now) if occupancy.cooling_until else 0.0
                cooling.add_metric([service.name], left_s)
                circuit.add_metric([service.name], int(occupancy.circuit != "closed"))
                rate.add_metric([service.name], occupancy.requests_in_window)
                rate_limit.add_metric([service.name], service.requests_per_minute)
                tokens.add_metric([service.name], occupancy.tokens_in_window)
                tokens_limit.add_metric([service.name], service.tokens_per_minute)
            for queue, ready, delayed in queue_depths((*settings.CAO_QUEUES, settings.CAO_WEBHOOK_QUEUE)):
                depth.add_metric([queue, "ready"], ready)
                depth.add_metric([queue, "delayed"], delayed)
        except Exception:
            # A scrape must not fail because Redis or the broker is down;
            # the missing series are the signal.
            logger.warning("Could not read shared state for /metrics.", exc_info=True)
        yield from (in_use, limit, waiters, depth, cooling, circuit, rate, rate_limit, tokens, tokens_limit)


def gateway_registry():
    """Every process's metrics on this host (multiprocess mode) or this process's, plus shared state."""
    registry = CollectorRegistry()
    if settings.PROMETHEUS_MULTIPROC_DIR:
        MultiProcessCollector(registry)
    else:
        registry.register(_ProcessLocal())
    registry.register(SharedStateCollector())
    return registry


class _ProcessLocal:
    def collect(self):
        return REGISTRY.collect()


FORBIDDEN_BODY = error_body("FORBIDDEN", "Metrics need the bearer token (CAO_METRICS_TOKEN) or an allowed address.")


def scrape_allowed(*, authorization, remote_addr):
    """The bearer token when one is set, else an address in CAO_METRICS_ALLOWED_IPS."""
    token = settings.CAO_METRICS_TOKEN
    if token:
        return hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode())
    return remote_addr in settings.CAO_METRICS_ALLOWED_IPS


@require_GET
def metrics(request):
    if not scrape_allowed(authorization=request.headers.get("Authorization"), remote_addr=request.META.get("REMOTE_ADDR")):
        return JsonResponse(FORBIDDEN_BODY, status=403)
    return HttpResponse(generate_latest(gateway_registry()), content_type=CONTENT_TYPE_LATEST)
