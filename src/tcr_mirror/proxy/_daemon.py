"""The node daemon: the store, the upstreams and the HTTP servers, wired.

Everything long-lived hangs off one nursery: the listeners, the blob
fetches (so a fetch outlives the request that started it) and the metrics
server. SIGTERM or SIGINT cancels it; the store is closed on the way out.
"""

from __future__ import annotations

import logging
import os
import signal
from urllib.parse import urlsplit

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tcr_mirror import __version__
from tcr_mirror.proxy._config import NodeConfig, UpstreamConfig
from tcr_mirror.proxy._credentials import ControlPlaneCredentials
from tcr_mirror.proxy._fetch import BlobFetcher
from tcr_mirror.proxy._http import HttpServer, Request, Response
from tcr_mirror.proxy._metrics import MirrorMetrics, StoreCollector
from tcr_mirror.proxy._mirror import Mirror, Upstreams
from tcr_mirror.proxy._store import BlobStore, StoreBudget
from tcr_mirror.proxy._upstream import (
    CredentialSource,
    StaticCredentials,
    Upstream,
    UpstreamTimeouts,
)

__all__ = ["run_node", "serve_until_signal"]

logger = logging.getLogger(__name__)


def build_upstreams(config: NodeConfig, metrics: MirrorMetrics) -> Upstreams:
    timeouts = UpstreamTimeouts(config.connect_timeout, config.read_timeout)
    proxies = config.proxy_policy(os.environ)
    upstreams = []
    default = None
    for up in config.upstreams:
        proxy = proxies.for_url(up.url)
        if proxy is not None:
            logger.info(
                "upstream_proxy",
                extra={
                    "upstream": up.namespace,
                    "proxy": proxy.address,
                    "source": proxies.source,
                },
            )
        upstream = Upstream(
            up.namespace,
            up.url,
            credentials=_credential_source(config, up),
            timeouts=timeouts,
            user_agent=f"tcr-mirror/{__version__}",
            metrics=metrics,
            ca_file=config.ca_file,
            proxies=proxies,
        )
        upstreams.append(upstream)
        if up.default:
            default = upstream
    return Upstreams(upstreams, default)


def _credential_source(
    config: NodeConfig, upstream: UpstreamConfig
) -> CredentialSource | None:
    if upstream.credentials_url:
        assert config.node_secret is not None
        registry = urlsplit(upstream.url).netloc
        return ControlPlaneCredentials(
            upstream.credentials_url,
            registry,
            config.node_secret,
            refresh=config.credentials_refresh,
            ca_file=config.ca_file,
        )
    if upstream.credentials:
        return StaticCredentials(upstream.credentials)
    return None


async def run_node(
    config: NodeConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mirror until cancelled.

    Reports ``(host, port)`` of the bound listener through ``task_status``.
    """
    budget = StoreBudget(
        config.max_store_bytes, config.store_high_watermark, config.store_low_watermark
    )
    store = BlobStore(config.data_dir, budget)
    recovered = store.recover()
    logger.info(
        "store_recovered", extra={"data_dir": str(config.data_dir), **recovered}
    )
    metrics = MirrorMetrics()
    upstreams = build_upstreams(config, metrics)
    try:
        async with trio.open_nursery() as nursery:
            fetcher = BlobFetcher(store, nursery)
            metrics.registry.register(_store_collector(store, fetcher))
            mirror = Mirror(
                store, fetcher, upstreams, tag_ttl=config.tag_ttl, metrics=metrics
            )
            served = metrics.served_bytes

            def on_sent(source: str, sent: int) -> None:
                served.labels(source).inc(sent)

            host, port = config.listen
            listeners = await trio.open_tcp_listeners(port, host=host)
            server = HttpServer(mirror.handle, on_sent=on_sent)
            await nursery.start(server.serve, listeners)
            bound = listeners[0].socket.getsockname()[:2]
            if config.metrics_listen is not None:
                await _start_metrics(nursery, config.metrics_listen, metrics)
            logger.info(
                "node_listening",
                extra={
                    "address": f"{bound[0]}:{bound[1]}",
                    "upstreams": [up.namespace for up in config.upstreams],
                },
            )
            task_status.started((bound[0], bound[1]))
    finally:
        with trio.CancelScope(shield=True):
            await upstreams.aclose()
        store.close()


def _store_collector(store: BlobStore, fetcher: BlobFetcher) -> StoreCollector:
    return StoreCollector(
        used_bytes=lambda: store.used_bytes,
        budget_bytes=lambda: store.budget.max_bytes,
        evictions=lambda: (store.evictions, store.evicted_bytes),
        fetches_in_flight=lambda: fetcher.statistics()["in_flight"],
    )


async def _start_metrics(
    nursery: trio.Nursery, address: tuple[str, int], metrics: MirrorMetrics
) -> None:
    async def handle(request: Request) -> Response:
        path = request.target.partition("?")[0]
        if path in ("/healthz", "/readyz"):
            return Response(200, [("Content-Type", "text/plain")], b"ok\n")
        if path == "/metrics":
            body = generate_latest(metrics.registry)
            return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
        return Response(404, [("Content-Type", "text/plain")], b"not found\n")

    host, port = address
    listeners = await trio.open_tcp_listeners(port, host=host)
    await nursery.start(HttpServer(handle, log_requests=False).serve, listeners)
    bound = listeners[0].socket.getsockname()[:2]
    logger.info("metrics_listening", extra={"address": f"{bound[0]}:{bound[1]}"})


async def serve_until_signal(config: NodeConfig) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_node, config)
            async for signum in signals:
                logger.info(
                    "node_stopping", extra={"signal": signal.Signals(signum).name}
                )
                nursery.cancel_scope.cancel()
                break
