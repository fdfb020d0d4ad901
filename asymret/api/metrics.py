"""Prometheus metrics of the service (``/metrics``): requests by route and status, latency, query batch sizes
and the items in each open gallery, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily


class Metrics:
    """Prometheus metrics in a registry of their own (several apps may live in one process)."""

    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.requests = Counter("asymret_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("asymret_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10),
                                 registry=self.registry)
        self.batch_size = Histogram("asymret_query_batch_size", "query images per query-network forward pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.registry.register(GallerySizes(service))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class GallerySizes:
    """``asymret_gallery_items{gallery}``, read from the open galleries at scrape time."""

    def __init__(self, service):
        self.service = service

    def collect(self):
        family = GaugeMetricFamily("asymret_gallery_items", "items in each open gallery", labels=["gallery"])
        registry = self.service.registry  # None until the service has loaded
        for name, gallery in (registry.open_galleries() if registry is not None else []):
            family.add_metric([name], len(gallery))
        yield family
