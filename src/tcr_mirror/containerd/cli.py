"""``tcr-mirror containerd-config``: the command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._errors import HostsConfigError
from ._files import _HostDir, _locked, _sweep
from ._lookup import _claim, _existing_dirs, _managed_dirs, _registry_dirs
from ._names import check_mirror_url, check_registry
from ._plans import _apply_install, _apply_undo, _plan_install, _plan_undo, _Undo
from ._steps import _HOSTS_NAME, BACKUP_NAME, InstallStep, UndoStep

__all__ = ["register"]


_DEFAULT_CERTS_DIR = Path("/etc/containerd/certs.d")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "containerd-config",
        help="write (or undo) containerd hosts.toml files that use the mirror",
        description="Write hosts.toml for each REGISTRY (host[:port], or "
        "_default for every registry without its own directory) in the "
        "directory of CERTS_DIR containerd reads for it, so that containerd "
        "pulls through the node mirror and falls back to the registry "
        "itself with the settings it had. An existing foreign hosts.toml "
        f"is kept as {BACKUP_NAME}; --undo puts it back.",
    )
    parser.add_argument("registries", nargs="*", metavar="REGISTRY")
    parser.add_argument(
        "--certs-dir",
        type=Path,
        default=_DEFAULT_CERTS_DIR,
        help=f"containerd's registry config_path ({_DEFAULT_CERTS_DIR})",
    )
    parser.add_argument("--mirror", metavar="URL", help="e.g. http://127.0.0.1:5000")
    parser.add_argument(
        "--skip-verify",
        action="store_true",
        help="do not verify the mirror's TLS certificate (https mirrors)",
    )
    parser.add_argument(
        "--undo",
        action="store_true",
        help="restore the backups or remove our files (all of ours when no "
        "REGISTRY is given)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print what would change; change nothing"
    )
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    """Entry point of the subcommand; returns the exit status.

    Raises:
        HostsConfigError: bad input, a state on disk we refuse to touch, or
            a file system error, each as one line.
    """
    certs_dir: Path = args.certs_dir
    registries = list(dict.fromkeys(check_registry(r) for r in args.registries))
    try:
        if args.undo:
            return _run_undo(certs_dir, registries, dry_run=args.dry_run)
        if args.mirror is None:
            raise HostsConfigError("--mirror URL is required (or use --undo)")
        if not registries:
            raise HostsConfigError("name at least one REGISTRY (or _default)")
        mirror = check_mirror_url(args.mirror)
        if args.skip_verify and mirror.startswith("http://"):
            # containerd 2.x would then try HTTPS on the mirror first, and
            # fall back to HTTP on every new connection.
            raise HostsConfigError("--skip-verify is for https mirrors only")
        return _run_install(certs_dir, registries, args)
    except OSError as exc:
        where = exc.filename or certs_dir
        reason = exc.strerror or str(exc)
        raise HostsConfigError(f"cannot update {where}: {reason}") from None


def _run_install(
    certs_dir: Path, registries: Sequence[str], args: argparse.Namespace
) -> int:
    dry_run: bool = args.dry_run
    with _locked(certs_dir, create=not dry_run):
        if not dry_run:
            _sweep(certs_dir)
        # Plan everything first, so that a refusal changes nothing at all.
        plans = []
        claimed: dict[Path, str] = {}
        for registry in registries:
            active, hidden = _registry_dirs(certs_dir, registry)
            _claim(claimed, registry, (active, *hidden))
            if not dry_run:
                for path in (active, *hidden):
                    _sweep(path)
            # A directory containerd does not read keeps none of our files,
            # so that none comes back to life if the one it reads goes.
            undos = [_plan_undo(_HostDir(path)) for path in hidden]
            install = _plan_install(
                _HostDir(active), registry, args.mirror, skip_verify=args.skip_verify
            )
            plans.append((install, undos))

        for install, undos in plans:
            if not dry_run:
                _apply_install(install)
            _report(install.step.value, install.host_dir.hosts, dry_run=dry_run)
            if dry_run and install.step is not InstallStep.UNCHANGED:
                sys.stdout.write(install.shown)
            for undo in undos:
                _undo_one(undo, dry_run=dry_run, quiet=True)
    return 0


def _run_undo(certs_dir: Path, registries: Sequence[str], *, dry_run: bool) -> int:
    with _locked(certs_dir, create=False):
        if not dry_run:
            _sweep(certs_dir)
        if registries:
            paths = [p for r in registries for p in _existing_dirs(certs_dir, r)]
        else:
            paths = _managed_dirs(certs_dir)
        for path in paths:
            if not dry_run:
                _sweep(path)
            plan = _plan_undo(_HostDir(path)) if path.is_dir() else None
            if plan is None:
                _report(UndoStep.NOTHING.value, path / _HOSTS_NAME, dry_run=dry_run)
            else:
                _undo_one(plan, dry_run=dry_run, quiet=False)
    return 0


def _undo_one(plan: _Undo, *, dry_run: bool, quiet: bool) -> None:
    if not dry_run:
        _apply_undo(plan)
    idle = plan.step in (UndoStep.NOTHING, UndoStep.LEAVE_FOREIGN)
    if not (quiet and idle):
        _report(plan.step.value, plan.host_dir.hosts, dry_run=dry_run)


def _report(step: str, path: Path, *, dry_run: bool) -> None:
    prefix = "dry run: " if dry_run else ""
    print(f"{prefix}{step}: {path}")
