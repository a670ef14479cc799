"""The ``tcr-mirror`` command: one subcommand per part of the project.

Each part owns its subcommands in its own ``cli`` module and exposes
``register(subparsers)``; this module only wires them together, so that the
node daemon never imports the control plane and the reverse.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that add subcommands. Each has ``register(subparsers) -> None``;
# the parser it adds sets ``func`` to a callable taking the parsed args and
# returning the exit status.
_PARTS = (
    "tcr_mirror.proxy.cli",
    "tcr_mirror.containerd.cli",
    "tcr_mirror.control.cli",
    "tcr_mirror.control.sim.cli",
)


class CliError(Exception):
    """A user mistake: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tcr-mirror",
        description="Node-local, peer-to-peer caching mirror for Tencent "
        "Container Registry, and its control plane.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A part not written yet; anything else missing is a real bug.
            if exc.name is None or not name.startswith(exc.name):
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.func(args)
    except CliError as exc:
        print(f"tcr-mirror: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
