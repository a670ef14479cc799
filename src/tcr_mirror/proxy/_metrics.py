"""Prometheus metrics of the node mirror.

One :class:`MirrorMetrics` per daemon, on its own registry (so tests can run
several daemons in one process). Names follow ``tcr_mirror_<area>_<name>``
with base units and ``_total`` counters; prometheus-client appends the
``_total`` to counters itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

__all__ = [
    "ConnectionCollector",
    "MirrorMetrics",
    "RequestCounter",
    "StoreCollector",
    "method_label",
]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

# The pull API has two methods. Any token is a valid HTTP method, so a label
# taken from the request as it came would give a client that invents
# methods one new series per request, without limit.
_PULL_METHODS = frozenset({"GET", "HEAD"})


def method_label(method: str) -> str:
    """``GET`` or ``HEAD`` as they are; every other method is ``other``."""
    return method if method in _PULL_METHODS else "other"


class RequestCounter:
    """``tcr_mirror_requests_total`` by kind, method and status.

    Its :meth:`labels` folds the method through :func:`method_label`, so
    the series stay few whatever methods clients send.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counter = Counter(
            "tcr_mirror_requests",
            "Client requests answered, by kind, method (GET, HEAD, other) and status.",
            ["kind", "method", "status"],
            registry=registry,
        )

    def labels(self, kind: str, method: str, status: str) -> Counter:
        return self._counter.labels(kind, method_label(method), status)


class MirrorMetrics:
    """The daemon's counters, gauges and histograms."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = RequestCounter(r)
        self.cache_results = Counter(
            "tcr_mirror_cache_results",
            "Cache lookups by kind and result (hit, miss, joined, revalidated, stale).",
            ["kind", "result"],
            registry=r,
        )
        self.served_bytes = Counter(
            "tcr_mirror_served_bytes",
            "Blob and manifest bytes sent to clients, by source (store, upstream).",
            ["source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "tcr_mirror_upstream_requests",
            "Requests sent upstream, by upstream and status (or error).",
            ["upstream", "status"],
            registry=r,
        )
        self.upstream_latency = Histogram(
            "tcr_mirror_upstream_request_duration_seconds",
            "Time from sending an upstream request to its response head or failure.",
            ["upstream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_last_success = Gauge(
            "tcr_mirror_upstream_last_success_timestamp_seconds",
            "Unix time of the last upstream answer that was not a 5xx "
            "(nor a proxy's 407).",
            ["upstream"],
            registry=r,
        )
        self.fetch_waiting_clients = Gauge(
            "tcr_mirror_blob_fetch_waiting_clients",
            "Clients reading a blob that was being fetched when they asked, "
            "until their body ends.",
            registry=r,
        )

    def observe_upstream(
        self, upstream: str, status: int | None, seconds: float, now: float
    ) -> None:
        label = "error" if status is None else str(status)
        self.upstream_requests.labels(upstream, label).inc()
        # Failures are timed too: an upstream that times out shows as slow,
        # not as missing from the histogram.
        self.upstream_latency.labels(upstream).observe(seconds)
        # A 407 is the proxy on the way refusing us; the upstream said nothing.
        if status is not None and status < 500 and status != 407:
            self.upstream_last_success.labels(upstream).set(now)


class StoreCollector(Collector):
    """Reads the store's and the fetcher's figures at scrape time."""

    def __init__(
        self,
        used_bytes: Callable[[], int],
        budget_bytes: Callable[[], int | None],
        evictions: Callable[[], tuple[int, int]],
        fetches_in_flight: Callable[[], int],
    ) -> None:
        self._used_bytes = used_bytes
        self._budget_bytes = budget_bytes
        self._evictions = evictions
        self._fetches_in_flight = fetches_in_flight

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield GaugeMetricFamily(
            "tcr_mirror_store_bytes",
            "Bytes of blobs stored plus those reserved by fetches in flight.",
            value=self._used_bytes(),
        )
        budget = self._budget_bytes()
        if budget is not None:
            yield GaugeMetricFamily(
                "tcr_mirror_store_budget_bytes",
                "The store's byte budget.",
                value=budget,
            )
        count, size = self._evictions()
        yield CounterMetricFamily(
            "tcr_mirror_store_evictions",
            "Blobs evicted to keep the store under its budget.",
            value=count,
        )
        yield CounterMetricFamily(
            "tcr_mirror_store_evicted_bytes",
            "Bytes of blobs evicted.",
            value=size,
        )
        yield GaugeMetricFamily(
            "tcr_mirror_blob_fetches_in_flight",
            "Blob fetches from upstream running now.",
            value=self._fetches_in_flight(),
        )


class ConnectionCollector(Collector):
    """Reads the mirror's client connections at scrape time.

    Args:
        statistics: The server's ``statistics()``: ``connections``,
            ``connections_refused`` and ``max_connections``.
    """

    def __init__(self, statistics: Callable[[], dict[str, int]]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        figures = self._statistics()
        yield GaugeMetricFamily(
            "tcr_mirror_client_connections",
            "Client connections open.",
            value=figures["connections"],
        )
        yield GaugeMetricFamily(
            "tcr_mirror_client_connections_limit",
            "Client connections served at most at once.",
            value=figures["max_connections"],
        )
        yield CounterMetricFamily(
            "tcr_mirror_client_connections_refused",
            "Client connections closed at once for being past the limit.",
            value=figures["connections_refused"],
        )
