"""``tcr-mirror sim``: run the TCR simulator until SIGTERM or SIGINT.

It accepts one key pair, read from ``TENCENTCLOUD_SECRET_ID`` and
``TENCENTCLOUD_SECRET_KEY`` like the SDKs, and announces where it listens
as one JSON line on stderr (``"event": "sim_listening"``), so a test that
asked for port 0 can read the port back.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import trio

from ...cli import CliError
from .._credentials import CloudCredentials
from ._app import Simulator
from ._http import serve_listeners_http
from ._persist import StateFileError, load, save
from ._schema import SimError
from ._state import REGION_IDS, SimConfig
from ._verify import Key

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add the ``sim`` subcommand."""
    parser = subparsers.add_parser(
        "sim",
        help="run a TCR API simulator with a registry token service",
        description="Serve the TCR API 3.0 actions and a Docker token service "
        "on one address. Keys come from TENCENTCLOUD_SECRET_ID and "
        "TENCENTCLOUD_SECRET_KEY.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    parser.add_argument("--region", default="ap-guangzhou")
    parser.add_argument(
        "--registry-cert-out",
        metavar="PATH",
        help="write the token-signing certificate (PEM) here, for the "
        "registry's auth.token.rootcertbundle",
    )
    parser.add_argument("--issuer", default="tcr-mirror-sim", help="registry JWT iss")
    parser.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="NAME",
        help="start with a Running Enterprise instance of this name (repeatable)",
    )
    parser.add_argument("--owner-uin", default=SimConfig.owner_uin)
    parser.add_argument(
        "--deploy-seconds", type=float, default=SimConfig.deploy_seconds
    )
    parser.add_argument("--seed", type=int, help="make generated ids reproducible")
    parser.add_argument(
        "--state-file",
        type=Path,
        metavar="PATH",
        help="load the simulated account (instances, tokens, Personal edition, "
        "token-signing key) from here at start if it exists, and save it here "
        "on SIGTERM/SIGINT; mode 0600, it holds a private key",
    )
    parser.set_defaults(func=run)


def _listen_address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise CliError(f"--listen wants HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def run(args: argparse.Namespace) -> int:
    """Start the simulator; returns 0 after SIGTERM/SIGINT."""
    try:
        credentials = CloudCredentials.from_env(os.environ)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    host, port = _listen_address(args.listen)
    if args.region not in REGION_IDS:
        raise CliError(f"unknown region {args.region!r}")
    config = SimConfig(
        region=args.region,
        owner_uin=args.owner_uin,
        operator_uin=args.owner_uin,
        deploy_seconds=args.deploy_seconds,
    )
    try:
        saved = load(args.state_file) if args.state_file else None
        simulator = Simulator(
            {credentials.secret_id: Key(credentials.secret_key, credentials.token)},
            config=config,
            seed=args.seed,
            issuer=args.issuer,
            signing_key=saved.signing_key if saved else None,
        )
        if saved is not None:
            saved.restore_into(simulator.state)
    except StateFileError as exc:
        raise CliError(str(exc)) from None
    instances = {i.name: i.registry_id for i in simulator.state.instances.values()}
    for name in args.instance:
        if name in instances:
            continue  # restored from the state file
        try:
            instances[name] = simulator.add_instance(name)
        except SimError as exc:
            raise CliError(f"--instance {name}: {exc.message}") from None
    if args.registry_cert_out:
        try:
            with open(args.registry_cert_out, "wb") as file:
                file.write(simulator.state.signing_key.certificate_pem())
        except OSError as exc:
            raise CliError(
                f"cannot write {args.registry_cert_out}: {exc.strerror}"
            ) from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    trio.run(_serve, simulator, host, port, instances)
    if args.state_file:
        try:
            save(simulator.state, args.state_file)
        except OSError as exc:
            raise CliError(f"cannot save {args.state_file}: {exc.strerror}") from None
    return 0


async def _serve(
    simulator: Simulator, host: str, port: int, instances: dict[str, str]
) -> None:
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CliError(f"cannot listen on {host}:{port} (--listen): {reason}") from None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_listeners_http, simulator.handle, listeners)
            bound_host, bound_port = listeners[0].socket.getsockname()[:2]
            address = f"{bound_host}:{bound_port}"
            announcement = {
                "event": "sim_listening",
                "address": address,
                "endpoint": f"http://{address}",
                "token_realm": f"http://{address}/service/token",
                "issuer": simulator.registry_auth.issuer,
                "region": simulator.config.region,
                "instances": instances,
            }
            print(json.dumps(announcement), file=sys.stderr, flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break
