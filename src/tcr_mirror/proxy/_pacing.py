"""Connections that never leave this host are sent without pacing.

containerd reaches the mirror over loopback, or over the node's own
address, which the kernel routes through loopback too. Where the host's
default congestion control paces its sending (BBR, as on many cloud
images), the kernel arms a timer per burst even there, which only costs
CPU; reno never paces, and every Linux kernel has it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import trio

__all__ = ["same_host", "unpace_if_same_host"]


def same_host(peer: str, local: str) -> bool:
    """Whether a connection from ``peer`` to ``local`` stays on this host.

    True for loopback addresses (also IPv4 ones mapped into IPv6) and for a
    host connecting to its own address, as containerd does when it reaches
    the mirror by the node's IP: the kernel routes both through loopback.
    """
    try:
        peer_address = _unmapped(ipaddress.ip_address(peer.partition("%")[0]))
        local_address = _unmapped(ipaddress.ip_address(local.partition("%")[0]))
    except ValueError:
        return False
    return peer_address.is_loopback or peer_address == local_address


def _unmapped(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


# A congestion control that never paces. Every Linux kernel has reno, and an
# unprivileged process may always pick it.
_UNPACED = b"reno"


def unpace_if_same_host(sock: trio.socket.SocketType) -> None:
    """Turns off pacing on a connection that never leaves this host.

    Where the host's default congestion control is BBR, as on many cloud
    images, the kernel paces every send with timers; over loopback that
    only costs CPU. With reno, serving a blob being fetched took 0.5 s less
    CPU per GiB in ``loadtest/bench_node.py`` (2.68 -> 2.12). Connections
    from other hosts keep the host's choice.
    """
    try:
        peer, local = sock.getpeername()[0], sock.getsockname()[0]
    except OSError:
        return
    if same_host(peer, local):
        # Best effort: a kernel without TCP_CONGESTION keeps its default.
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, _UNPACED)
