"""The node daemon: the store, the upstreams and the HTTP servers, wired.

Start-up opens the store, recovers it, and only then binds the listeners:
a client that connected while a large store is being recovered would wait
in the backlog instead of being refused and falling back to the registry.
Both happen before any task runs, so a port in use or an unusable data
directory is one :class:`NodeStartError`, not a traceback out of a nursery.

Everything long-lived hangs off one nursery: the listeners, the blob
fetches (so a fetch outlives the request that started it) and the metrics
server. SIGTERM or SIGINT drains the node: ``/readyz`` answers 503, the
mirror's listener closes, idle connections are closed, and the responses
in flight finish, with the fetches they read from, for up to
``drain_timeout`` seconds; a second signal or the timeout cuts what is
left. The store is closed on the way out.

``/healthz`` and ``/readyz`` are served on the mirror's own port (outside
``/v2/``, so no OCI path can clash) and on the metrics port. Being ready
means the store was recovered, the listener is up and no drain has begun.
Whether an upstream answers is left out on purpose: a cache that turns
unready when its registry is down would be taken out of service exactly
when its stored blobs and stale tags are all that still serve.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import lmdb
import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tcr_mirror import __version__
from tcr_mirror.proxy._config import NodeConfig, UpstreamConfig
from tcr_mirror.proxy._credentials import ControlPlaneCredentials
from tcr_mirror.proxy._fetch import BlobFetcher
from tcr_mirror.proxy._http import Handler, HttpServer, Request, Response
from tcr_mirror.proxy._httpproxy import ProxyPolicy
from tcr_mirror.proxy._metrics import (
    ConnectionCollector,
    MirrorMetrics,
    StoreCollector,
)
from tcr_mirror.proxy._mirror import Mirror, Upstreams
from tcr_mirror.proxy._store import BlobStore, StoreBudget
from tcr_mirror.proxy._upstream import (
    CredentialSource,
    StaticCredentials,
    Upstream,
    UpstreamTimeouts,
)

__all__ = ["Node", "NodeStartError", "open_node", "run_node", "serve_until_signal"]

logger = logging.getLogger(__name__)

_PROBES = ("/healthz", "/readyz")
# A scrape endpoint has a few clients; its connections come out of the same
# open-file limit the mirror's share is cut from (see _max_connections).
_METRICS_MAX_CONNECTIONS = 64


class NodeStartError(Exception):
    """The node cannot start: a port in use, an unusable data directory.

    The message is one line for the user.
    """


def build_upstreams(config: NodeConfig, metrics: MirrorMetrics) -> Upstreams:
    timeouts = UpstreamTimeouts(config.connect_timeout, config.read_timeout)
    proxies = config.proxy_policy(os.environ)
    _log_proxies(config, proxies)
    upstreams = []
    default = None
    for up in config.upstreams:
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


def _log_proxies(config: NodeConfig, proxies: ProxyPolicy) -> None:
    for ignored in proxies.ignored:
        # No upstream goes through it (proxy_policy refuses to start
        # otherwise); a redirect to blob storage that would is refused
        # (Upstream.proxy_for).
        logger.warning(
            "proxy_variable_ignored",
            extra={
                "variable": ignored.variable,
                "proxy_scheme": ignored.scheme,
                "proxy": ignored.address,
                "reason": "only http:// proxies are supported",
            },
        )
    if proxies.http is not None or proxies.https is not None:
        for entry in proxies.skipped_no_proxy:
            # Skipped as Go skips it; said, so that a typo does not send
            # traffic meant to go direct through the proxy unnoticed.
            logger.warning(
                "no_proxy_entry_skipped",
                extra={"entry": entry, "reason": "it names no host, domain or network"},
            )
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


async def open_node(config: NodeConfig) -> Node:
    """Open and recover the store, then bind the listeners.

    Raises:
        NodeStartError: The store or a listener cannot be opened.
    """
    store = _open_store(config)
    listeners: list[trio.SocketListener] = []
    try:
        listeners = await _listen(config.listen, "--listen")
        metrics_listeners = []
        if config.metrics_listen is not None:
            metrics_listeners = await _listen(config.metrics_listen, "--metrics-listen")
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        store.close()
        raise
    return Node(config, store, listeners, metrics_listeners)


def _open_store(config: NodeConfig) -> BlobStore:
    budget = StoreBudget(
        config.max_store_bytes, config.store_high_watermark, config.store_low_watermark
    )
    try:
        store = BlobStore(config.data_dir, budget)
    except (OSError, lmdb.Error) as exc:
        raise _store_error(config, exc) from exc
    try:
        recovered = store.recover()
    except (OSError, lmdb.Error) as exc:
        store.close()
        raise _store_error(config, exc) from exc
    logger.info(
        "store_recovered", extra={"data_dir": str(config.data_dir), **recovered}
    )
    return store


def _store_error(config: NodeConfig, exc: Exception) -> NodeStartError:
    reason = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        reason = f"{where}{exc.strerror}"
    return NodeStartError(f"cannot use data directory {config.data_dir}: {reason}")


async def _listen(address: tuple[str, int], flag: str) -> list[trio.SocketListener]:
    host, port = address
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise NodeStartError(
            f"cannot listen on {host}:{port} ({flag}): {reason}"
        ) from exc


class Node:
    """A node whose store is open and whose listeners are bound.

    :meth:`serve` runs it; :meth:`drain` asks it to stop without cutting a
    response. Made by :func:`open_node`.
    """

    def __init__(
        self,
        config: NodeConfig,
        store: BlobStore,
        listeners: list[trio.SocketListener],
        metrics_listeners: list[trio.SocketListener],
    ) -> None:
        self._config = config
        self._store = store
        self._listeners = listeners
        self._metrics_listeners = metrics_listeners
        self.metrics = MirrorMetrics()
        self._server: HttpServer | None = None
        self._ready = False
        self._drained = trio.Event()

    @property
    def ready(self) -> bool:
        """Serving, and not draining: what ``/readyz`` answers."""
        return self._ready

    def drain(self) -> None:
        """Turn unready, stop accepting, let the responses in flight finish.

        :meth:`serve` returns once they have. Call it after :meth:`serve`
        has reported its address.
        """
        self._ready = False
        if self._server is not None:
            self._server.drain()

    def statistics(self) -> dict[str, int]:
        """The mirror listener's open connections and responses in flight."""
        if self._server is None:
            return {"connections": 0, "responses_in_flight": 0}
        return self._server.statistics()

    async def serve(
        self,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled, or until a drain has finished; then close.

        Reports ``(host, port)`` of the mirror's listener through
        ``task_status``. The store is closed whichever way it ends.
        """
        upstreams: Upstreams | None = None
        try:
            upstreams = build_upstreams(self._config, self.metrics)
            async with trio.open_nursery() as nursery:
                await self._start(nursery, upstreams, task_status)
                await self._drained.wait()
                # Nothing reads the fetches still running.
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if upstreams is not None:
                    await upstreams.aclose()
            self._store.close()
            logger.info("node_stopped", extra={"drained": self._drained.is_set()})

    async def _start(
        self,
        nursery: trio.Nursery,
        upstreams: Upstreams,
        task_status: trio.TaskStatus[tuple[str, int]],
    ) -> None:
        fetcher = BlobFetcher(self._store, nursery)
        nursery.start_soon(self._store.keep_synced)  # bounds what a power cut loses
        # Control-plane credentials renew beside the mirror, never in the
        # way of a pull.
        nursery.start_soon(upstreams.keep_credentials_fresh)
        self.metrics.registry.register(_store_collector(self._store, fetcher))
        mirror = Mirror(
            self._store,
            fetcher,
            upstreams,
            tag_ttl=self._config.tag_ttl,
            metrics=self.metrics,
        )
        served = self.metrics.served_bytes

        def on_sent(source: str, sent: int) -> None:
            served.labels(source).inc(sent)

        self._server = HttpServer(
            self._mirror_handler(mirror),
            on_sent=on_sent,
            quiet_paths=_PROBES,
            max_connections=_max_connections(),
            on_refused=self._count_refused,
        )
        self.metrics.registry.register(ConnectionCollector(self._server.statistics))
        await nursery.start(self._serve_clients, self._server)
        if self._metrics_listeners:
            metrics_server = HttpServer(
                self._metrics_handler(),
                log_requests=False,
                max_connections=_METRICS_MAX_CONNECTIONS,
            )
            await nursery.start(metrics_server.serve, self._metrics_listeners)
            logger.info(
                "metrics_listening",
                extra={"address": _address(self._metrics_listeners)},
            )
        self._ready = True
        logger.info(
            "node_listening",
            extra={
                "address": _address(self._listeners),
                "upstreams": [up.namespace for up in self._config.upstreams],
            },
        )
        host, port = self._listeners[0].socket.getsockname()[:2]
        task_status.started((host, port))

    async def _serve_clients(
        self,
        server: HttpServer,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]],
    ) -> None:
        await server.serve(self._listeners, task_status=task_status)
        self._drained.set()

    def _count_refused(self, method: str, status: int) -> None:
        # Answered by the server before routing: no kind to name but this.
        self.metrics.requests.labels("invalid", method, str(status)).inc()

    def _mirror_handler(self, mirror: Mirror) -> Handler:
        async def handle(request: Request) -> Response:
            path = request.target.partition("?")[0]
            if path in _PROBES:
                return self._probe(request.method, path)
            return await mirror.handle(request)

        return handle

    def _metrics_handler(self) -> Handler:
        async def handle(request: Request) -> Response:
            path = request.target.partition("?")[0]
            if path in _PROBES:
                return self._probe(request.method, path)
            if path == "/metrics":
                return self._metrics_page(request.method)
            return _text(404, "not found")

        return handle

    def _metrics_page(self, method: str) -> Response:
        if method not in ("GET", "HEAD"):
            return _not_allowed()
        body = generate_latest(self.metrics.registry)
        return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)

    def _probe(self, method: str, path: str) -> Response:
        if method not in ("GET", "HEAD"):
            return _not_allowed()
        if path == "/readyz" and not self._ready:
            return _text(503, "not ready")
        return _text(200, "ok")


def _not_allowed() -> Response:
    response = _text(405, "method not allowed")
    response.headers.append(("Allow", "GET, HEAD"))
    return response


def _text(status: int, line: str) -> Response:
    return Response(status, [("Content-Type", "text/plain")], f"{line}\n".encode())


def _address(listeners: list[trio.SocketListener]) -> str:
    host, port = listeners[0].socket.getsockname()[:2]
    return f"{host}:{port}"


def _store_collector(store: BlobStore, fetcher: BlobFetcher) -> StoreCollector:
    return StoreCollector(
        used_bytes=lambda: store.used_bytes,
        budget_bytes=lambda: store.budget.max_bytes,
        evictions=lambda: (store.evictions, store.evicted_bytes),
        fetches_in_flight=lambda: fetcher.statistics()["in_flight"],
    )


async def run_node(
    config: NodeConfig,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the mirror until cancelled.

    Reports ``(host, port)`` of the bound listener through ``task_status``.

    Raises:
        NodeStartError: The store or a listener cannot be opened.
    """
    node = await open_node(config)
    await node.serve(task_status=task_status)


async def serve_until_signal(config: NodeConfig) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT, drained.

    Raises:
        NodeStartError: The store or a listener cannot be opened.
    """
    _raise_open_file_limit()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        # Before any nursery, so that a start-up error comes out as itself
        # rather than inside an exception group.
        node = await open_node(config)
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_then_stop, node, nursery.cancel_scope)
            await _drain_on_signals(node, signals, config.drain_timeout)
            nursery.cancel_scope.cancel()


def _raise_open_file_limit() -> None:
    """Take the hard limit on open files as the soft one.

    Every client connection, blob being sent and fetch holds descriptors,
    and the soft limit a service starts with is often 1024 (systemd's
    default), far below what a node serving a rollout needs.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logger.debug(
        "open_file_limit",
        extra={"limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0]},
    )


def _max_connections() -> int:
    """Client connections to serve at once: half the open-file limit, as
    each may hold a blob file too, and the rest is for fetches, LMDB and
    the metrics listener's few connections."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(16, soft // 2 - 32)


async def _serve_then_stop(
    node: Node,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    await node.serve(task_status=task_status)
    # Drained: the wait for a second signal is over too.
    scope.cancel()


async def _drain_on_signals(
    node: Node, signals: AsyncIterator[int], drain_timeout: float
) -> None:
    """Drain on the first signal; return on a second one or the timeout.

    Returning cuts the responses still in flight; a drain that finishes
    first cancels this wait from outside.
    """
    first = await anext(signals)
    logger.info(
        "node_draining",
        extra={
            "signal": signal.Signals(first).name,
            "drain_timeout": drain_timeout,
            **node.statistics(),
        },
    )
    node.drain()
    with trio.move_on_after(drain_timeout):
        second = await anext(signals)
        logger.warning(
            "node_drain_cut",
            extra={"signal": signal.Signals(second).name, **node.statistics()},
        )
        return
    logger.warning(
        "node_drain_timed_out",
        extra={"drain_timeout": drain_timeout, **node.statistics()},
    )
