"""``tcr-mirror containerd-config``: point containerd at the node mirror.

containerd (1.5+) finds a registry's configuration under its ``config_path``
by trying ``host_port_`` (the spelling of ``host:port`` for file systems
without colons), then ``host:port``, then ``_default``, and it takes the
first directory that exists, whatever is in it. There it reads
``hosts.toml``; only when that is missing, empty or invalid does it use the
Docker-style certificate files beside it instead (``*.crt`` CAs and
``*.cert``/``*.key`` client pairs). Each ``[host."URL"]`` table is a mirror,
tried in order; the top-level ``server`` and its settings are the registry
itself, tried last. For a host other than the registry containerd adds
``?ns=<registry>``, which is how the node mirror knows the upstream.
Changes take effect without restarting containerd.

So installing is writing one ``hosts.toml``, in the directory containerd
picks, that is the configuration it replaces with our mirror put first:
the server, its TLS and header settings, the other hosts and the
certificate files all carry over, so the fallback to the registry works as
it did. A hosts.toml that tomllib cannot read is left alone with an error:
containerd's parser may read it (go-toml skips a byte order mark, for
one), so what it carries is unknown. Removing is putting back what was
there before.

The decisions (what to write, which step to take given what is on disk)
are pure functions; the layer below them reads and writes the files:

- ``_names`` checks registry names and the mirror URL, and (with
  ``tcr_mirror._redact``) keeps credentials out of messages;
- ``_carry`` reads what containerd made of the configuration we replace
  (with ``_toml_headers``, as containerd 2.0+ lists hosts by table header),
  and ``_render`` writes the hosts.toml that keeps it behind the mirror;
- ``_steps`` decides, for each state on disk, what installing and undoing do;
- ``_lookup`` finds the directory containerd reads for a registry, and the
  ones that hold our files;
- ``_files`` takes the steps on disk, ``_plans`` joins the two, and ``cli``
  is the subcommand.
"""

from __future__ import annotations

from tcr_mirror._redact import redact

from ._carry import Carried, carry_over
from ._errors import HostsConfigError
from ._lookup import host_dir_names
from ._names import DEFAULT_NAMESPACE, check_mirror_url, check_registry
from ._render import MARKER, is_ours, render_hosts_toml
from ._steps import BACKUP_NAME, InstallStep, UndoStep, install_step, undo_step
from .cli import register

__all__ = [
    "BACKUP_NAME",
    "DEFAULT_NAMESPACE",
    "MARKER",
    "Carried",
    "HostsConfigError",
    "InstallStep",
    "UndoStep",
    "carry_over",
    "check_mirror_url",
    "check_registry",
    "host_dir_names",
    "install_step",
    "is_ours",
    "redact",
    "register",
    "render_hosts_toml",
    "undo_step",
]
