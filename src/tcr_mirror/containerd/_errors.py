"""The one error of ``tcr-mirror containerd-config``."""

from __future__ import annotations

from tcr_mirror.cli import CliError

__all__ = ["HostsConfigError"]


class HostsConfigError(CliError):
    """Bad input or a state on disk we refuse to touch (one-line message)."""
