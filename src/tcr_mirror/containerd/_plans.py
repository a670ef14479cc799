"""Plans: the decisions, taken on what is on disk, and applied."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from ._carry import Carried, carry_over, rebased
from ._errors import HostsConfigError
from ._files import (
    _back_up,
    _create_dir,
    _fsync_dir,
    _HostDir,
    _mode_and_owner,
    _remove_dir,
    _write_atomic,
)
from ._names import DEFAULT_NAMESPACE
from ._render import _says_created, is_ours, render_hosts_toml
from ._steps import _HOSTS_NAME, InstallStep, UndoStep, install_step, undo_step


@dataclass(frozen=True)
class _Install:
    host_dir: _HostDir
    step: InstallStep
    desired: bytes
    shown: str
    created_dir: bool


@dataclass(frozen=True)
class _Undo:
    host_dir: _HostDir
    step: UndoStep
    remove_dir: bool


def _plan_install(
    host_dir: _HostDir, registry: str, mirror: str, *, skip_verify: bool
) -> _Install:
    current, backup = host_dir.read_hosts(), host_dir.read_backup()
    if current is None and host_dir.hosts.is_symlink():
        # Ours would replace the link, which then would be lost for good.
        raise HostsConfigError(
            f"{host_dir.hosts} is a symlink to nothing; fix or remove it first"
        )
    ours = current is not None and is_ours(current)
    if ours:
        created = _says_created(current)
    else:
        created = current is None and backup is None and not host_dir.path.exists()
    default_dir = _HostDir(host_dir.path.parent / DEFAULT_NAMESPACE)
    if created and registry != DEFAULT_NAMESPACE and default_dir.path.is_dir():
        # Without a directory of its own the registry was read from
        # _default, which the one we create hides from containerd.
        carried = rebased(_original(default_dir), f"../{DEFAULT_NAMESPACE}")
    else:
        carried = _original(host_dir)
    render = functools.partial(
        render_hosts_toml,
        registry,
        mirror,
        skip_verify=skip_verify,
        carried=carried,
        created_dir=created,
    )
    desired = render().encode()
    try:
        step = install_step(current, backup, desired)
    except HostsConfigError as exc:
        # With several registries, the operator must know which directory.
        raise HostsConfigError(f"{host_dir.path}: {exc}") from None
    return _Install(host_dir, step, desired, render(redact_secrets=True), created)


def _original(host_dir: _HostDir) -> Carried:
    """What containerd read from ``host_dir`` before our first install."""
    current, backup = host_dir.read_hosts(), host_dir.read_backup()
    # The backup if we made one, else a foreign file, else (None) the
    # certificate files.
    from_backup = backup is not None or (current is not None and is_ours(current))
    original = backup if from_backup else current
    source = host_dir.backup if from_backup else host_dir.hosts
    return _carry_over(host_dir, original, source)


def _carry_over(host_dir: _HostDir, original: bytes | None, source: Path) -> Carried:
    try:
        return carry_over(original, host_dir.cert_files())
    except HostsConfigError as exc:
        raise HostsConfigError(
            f"{source} is {exc}; containerd may read it otherwise, so it is "
            "left as it is: fix it or move it away first"
        ) from None


def _apply_install(plan: _Install) -> None:
    host_dir = plan.host_dir
    if plan.step is InstallStep.UNCHANGED:
        return
    if plan.step is InstallStep.CREATE and plan.created_dir:
        _create_dir(host_dir.path, plan.desired)
        return
    if plan.step is InstallStep.BACKUP_AND_REPLACE:
        _back_up(host_dir)
    mode, owner = _mode_and_owner(host_dir.hosts, host_dir.backup)
    _write_atomic(host_dir.hosts, plan.desired, mode, owner)


def _plan_undo(host_dir: _HostDir) -> _Undo:
    current = host_dir.read_hosts()
    step = undo_step(current, host_dir.read_backup())
    # Our directory goes only if nothing else has moved in since.
    remove_dir = (
        step is UndoStep.REMOVE
        and _says_created(current)
        and [p.name for p in host_dir.path.iterdir()] == [_HOSTS_NAME]
    )
    return _Undo(host_dir, step, remove_dir)


def _apply_undo(plan: _Undo) -> None:
    host_dir = plan.host_dir
    if plan.remove_dir:
        _remove_dir(host_dir.path)
        return
    if plan.step is UndoStep.RESTORE:
        # One rename: the original is back, inode, mode, owner and all, and
        # the backup is gone, with no state in between.
        os.rename(host_dir.backup, host_dir.hosts)
    elif plan.step is UndoStep.DROP_BACKUP:
        os.unlink(host_dir.backup)
    elif plan.step is UndoStep.REMOVE:
        os.unlink(host_dir.hosts)
    else:
        return
    _fsync_dir(host_dir.path)
