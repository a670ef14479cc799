"""``tcr-mirror node``: run the node mirror in the foreground."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio

from tcr_mirror._logging import configure_logging
from tcr_mirror.cli import CliError
from tcr_mirror.proxy._config import (
    LOG_LEVELS,
    ConfigError,
    NodeConfig,
    parse_host_port,
    parse_proxy,
    parse_size,
    parse_upstream_flag,
    read_credentials_file,
    read_secret_file,
    tls_context,
)
from tcr_mirror.proxy._daemon import NodeStartError, serve_until_signal
from tcr_mirror.proxy._httpproxy import parse_no_proxy

__all__ = ["build_node_parser", "register"]


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "node",
        help="run the node mirror (pull-through cache) in the foreground",
        description=_DESCRIPTION,
    )
    _add_options(parser)
    parser.set_defaults(func=_run)


def build_node_parser() -> argparse.ArgumentParser:
    """The ``node`` options alone, for tests and tools."""
    parser = argparse.ArgumentParser(prog="tcr-mirror node", description=_DESCRIPTION)
    _add_options(parser)
    return parser


_DESCRIPTION = (
    "Serve the OCI distribution pull API as a caching mirror of the configured "
    "upstream registries, until SIGTERM or SIGINT: the responses in flight "
    "then finish (see --drain-timeout), a second signal cuts them."
)


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file")
    parser.add_argument(
        "--listen", metavar="HOST:PORT", help="address to serve (127.0.0.1:5000)"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="blob store directory (/var/lib/tcr-mirror)"
    )
    parser.add_argument(
        "--upstream",
        action="append",
        metavar="[NS=]URL",
        help="an upstream registry on the allow-list; NS is the ns value "
        "containerd sends for it (default: the URL's host[:port]); the one "
        "given without NS= serves requests without ns. Repeatable; replaces "
        "the config file's upstreams",
    )
    parser.add_argument(
        "--credentials-file",
        action="append",
        metavar="[NS=]FILE",
        help="file whose first line is username:password for the upstream NS "
        "(the default upstream without NS=). Repeatable",
    )
    parser.add_argument(
        "--credentials-url",
        action="append",
        metavar="[NS=]URL",
        help="get the upstream NS's credentials (the default upstream's without "
        "NS=) from `tcr-mirror control serve` at URL, renewed while running. "
        "Repeatable; needs --node-secret-file",
    )
    parser.add_argument(
        "--node-secret-file",
        type=Path,
        metavar="FILE",
        help="file whose first line is the secret shared with the control plane",
    )
    parser.add_argument(
        "--credentials-refresh",
        type=float,
        metavar="SECONDS",
        help="ask the control plane for credentials this often (30)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve /metrics there, and /healthz and /readyz as the mirror's "
        "own port does",
    )
    parser.add_argument(
        "--tag-ttl", type=float, metavar="SECONDS", help="trust a tag this long (5)"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, let responses in flight finish this long "
        "before cutting them (10)",
    )
    parser.add_argument(
        "--max-store-bytes",
        metavar="SIZE",
        help="store budget, e.g. 50GiB; least recently used blobs are evicted "
        "past the high watermark down to the low one (no limit by default)",
    )
    parser.add_argument(
        "--store-watermarks",
        metavar="HIGH,LOW",
        help="fractions of the budget that start and stop eviction (0.9,0.8)",
    )
    parser.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS", help="upstream (5)"
    )
    parser.add_argument(
        "--read-timeout", type=float, metavar="SECONDS", help="upstream (30)"
    )
    parser.add_argument(
        "--ca-file",
        type=Path,
        metavar="PEM",
        help="also trust these CA certificates for HTTPS upstreams and the "
        "control plane (the system's CAs are always trusted)",
    )
    parser.add_argument(
        "--proxy",
        metavar="URL",
        help="reach upstreams through this HTTP proxy, http://host:port (default: "
        "HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment); credentials "
        "go in the config file or the environment, not here",
    )
    parser.add_argument(
        "--no-proxy",
        metavar="LIST",
        help="comma-separated hosts, .domains and networks reached without --proxy",
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS)


def _run(args: argparse.Namespace) -> int:
    try:
        config = _config_from_args(args)
        # A bad CA file or proxy variable stops the start, in one line.
        tls_context(config.ca_file)
        config.proxy_policy(os.environ)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    configure_logging(config.log_level)
    try:
        trio.run(serve_until_signal, config)
    except NodeStartError as exc:
        raise CliError(str(exc)) from exc
    return 0


# Flags that set a config field as they are, or through a parser.
_SIMPLE_FLAGS: dict[str, Callable[[Any], Any]] = {
    "listen": parse_host_port,
    "metrics_listen": parse_host_port,
    "data_dir": Path,
    "ca_file": Path,
    "tag_ttl": float,
    "drain_timeout": float,
    "log_level": str,
    "max_store_bytes": lambda text: parse_size(text, key="--max-store-bytes"),
    "connect_timeout": float,
    "read_timeout": float,
    "credentials_refresh": float,
}


def _config_from_args(args: argparse.Namespace) -> NodeConfig:
    config = NodeConfig.from_toml(args.config) if args.config else NodeConfig()
    changes: dict[str, Any] = {
        key: parse(getattr(args, key))
        for key, parse in _SIMPLE_FLAGS.items()
        if getattr(args, key) is not None
    }
    if args.store_watermarks:
        high, _, low = args.store_watermarks.partition(",")
        try:
            changes["store_high_watermark"] = float(high)
            changes["store_low_watermark"] = float(low)
        except ValueError as exc:
            raise ConfigError("--store-watermarks takes HIGH,LOW fractions") from exc
    if args.upstream:
        changes["upstreams"] = tuple(parse_upstream_flag(u) for u in args.upstream)
    if args.proxy:
        if "@" in args.proxy:
            raise ConfigError(
                "put proxy credentials in the config file or HTTPS_PROXY, "
                "not on the command line"
            )
        changes["proxy"] = parse_proxy(args.proxy)
    if args.no_proxy:
        changes["no_proxy"] = parse_no_proxy(args.no_proxy)
    if args.node_secret_file:
        changes["node_secret"] = read_secret_file(args.node_secret_file)
    config = replace(config, **changes)

    for item in args.credentials_file or ():
        config = _attach(config, item, "credentials", read_credentials_file)
    for item in args.credentials_url or ():
        config = _attach(config, item, "credentials_url", str)
    if not config.upstreams:
        raise ConfigError("no upstream: give --upstream URL or upstreams in --config")
    return config.validated()


def _attach(
    config: NodeConfig, item: str, field: str, read: Callable[[Any], Any]
) -> NodeConfig:
    """Set ``field`` of the upstream an ``[NS=]VALUE`` flag names."""
    namespace, sep, value = item.partition("=")
    if not sep or "://" in namespace or "/" in namespace:
        namespace, sep, value = "", "", item
    upstreams = list(config.upstreams)
    for index, up in enumerate(upstreams):
        if (sep and up.namespace == namespace) or (not sep and up.default):
            upstreams[index] = replace(up, **{field: read(value)})
            return replace(config, upstreams=tuple(upstreams))
    which = f"namespace {namespace!r}" if sep else "default upstream"
    raise ConfigError(f"--{field.replace('_', '-')} names no configured {which}")
