"""Install and undo decisions, one for each state on disk.

An init container runs this on every pod start and may die at any point,
so every change is one rename (or link) and every state between two of
them is one the next run recognises (F and G are foreign files, B a
backup)::

    hosts.toml  backup   install               --undo
    none        none     create                nothing
    ours        none     replace ours          remove ours
    ours        B        replace ours          restore B (one rename)
    none        B        create, keep B        restore B
    F           none     back up, replace      leave F
    F           F        replace               drop the extra backup
    G           B        refuse: both matter   leave both
"""

from __future__ import annotations

import enum

from ._errors import HostsConfigError
from ._render import is_ours

__all__ = ["BACKUP_NAME", "InstallStep", "UndoStep", "install_step", "undo_step"]


BACKUP_NAME = "hosts.toml.tcr-mirror-backup"
_HOSTS_NAME = "hosts.toml"


class InstallStep(enum.Enum):
    """What installing does to one registry's hosts.toml."""

    UNCHANGED = "unchanged"
    CREATE = "create"
    REPLACE_OURS = "replace ours"
    BACKUP_AND_REPLACE = "back up and replace"
    FINISH_REPLACE = "replace (backup already made)"


class UndoStep(enum.Enum):
    """What ``--undo`` does to one registry's hosts.toml."""

    NOTHING = "nothing to undo"
    REMOVE = "remove ours"
    RESTORE = "restore backup"
    DROP_BACKUP = "remove the backup of an unfinished install"
    LEAVE_FOREIGN = "leave foreign file"


def install_step(
    current: bytes | None, backup: bytes | None, desired: bytes
) -> InstallStep:
    """Decides how to install ``desired`` (None: no such file).

    Raises:
        HostsConfigError: a foreign file is there and a backup of another
            one already exists; replacing it would lose one of the two.
    """
    if current == desired:
        return InstallStep.UNCHANGED
    if current is None:
        return InstallStep.CREATE
    if is_ours(current):
        return InstallStep.REPLACE_OURS
    if backup is None:
        return InstallStep.BACKUP_AND_REPLACE
    if backup == current:
        return InstallStep.FINISH_REPLACE
    raise HostsConfigError(
        f"a foreign {_HOSTS_NAME} appeared after {BACKUP_NAME} was made; "
        "move one of them away first"
    )


def undo_step(current: bytes | None, backup: bytes | None) -> UndoStep:
    """Decides how to undo, given the two files (None: no such file)."""
    if current is not None and not is_ours(current):
        return UndoStep.DROP_BACKUP if backup == current else UndoStep.LEAVE_FOREIGN
    if backup is not None:
        return UndoStep.RESTORE
    if current is not None:
        return UndoStep.REMOVE
    return UndoStep.NOTHING
