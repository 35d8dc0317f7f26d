"""``GET /metrics``: what the server did, in Prometheus's text format, through
``prometheus-client``.

Requests are counted and timed as they are answered (`Metrics.observe`, from the
middleware); what the backend counts anyway (texts by source, tokens, storage errors) is read
from `Backend.stats` when Prometheus scrapes, so that ``/metrics``, ``/stats`` and the answers'
headers can never disagree. Each app has a registry of its own: two apps in one process (the
tests', a user's) never mix their counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# From a hit in under a millisecond to a cold batch computed on a CPU.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Any other method a client makes up is "other": a label takes few values.
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})
SOURCES = ("stored", "waited", "computed", "not_found")


class Metrics:
    """The registry of one app: its request counter and latency histogram, the backend's
    counts, and the process's own (CPU, memory, open files)."""

    def __init__(self, backend: Backend) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "embeddingcache_requests",
            "HTTP requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embeddingcache_request_duration_seconds",
            "Time from a request's headers to the end of its answer, by route",
            ["route"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_BackendCollector(backend))
        ProcessCollector(registry=self.registry)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method if method in METHODS else "other", str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _BackendCollector(Collector):
    """The backend's counts, read when scraped."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def collect(self) -> Iterator[Metric]:
        stats = self.backend.stats()
        texts = CounterMetricFamily(
            "embeddingcache_texts",
            "Texts served, counted by input, by where each came from: stored, waited (another "
            "request computed it while this one waited), computed, not_found (lookup only)",
            labels=["source"],
        )
        for source in SOURCES:
            texts.add_metric([source], stats[source])
        yield texts
        computed = CounterMetricFamily(
            "embeddingcache_tokens_computed",
            "Tokens of the texts this server computed, by model",
            labels=["model"],
        )
        saved = CounterMetricFamily(
            "embeddingcache_tokens_saved",
            "Tokens of the texts served from storage (what computing them again would cost)",
            labels=["model"],
        )
        for model, tokens in sorted(stats["tokens"].items()):
            computed.add_metric([model], tokens["computed"])
            saved.add_metric([model], tokens["saved"])
        yield computed
        yield saved
        for name, key, text in (
            ("storage_errors", "storage_errors", "Requests that failed on the server's storage"),
            ("vectors_not_stored", "not_stored", "Vectors served that could not be stored"),
            ("pushed_vectors", "accepted_pushes", "Vectors clients pushed that were stored"),
        ):
            yield CounterMetricFamily(f"embeddingcache_{name}", text, value=stats[key])
        yield GaugeMetricFamily(
            "embeddingcache_uptime_seconds", "Seconds since the server started", stats["uptime_s"]
        )
