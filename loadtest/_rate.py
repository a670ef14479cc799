"""A keep-alive request-rate client for HEAD, run as its own process.

wrk cannot time HEAD: its parser waits for the body a HEAD response only
announces, so every request hangs. ``ab -i`` speaks HTTP/1.0, which the
mirror (h11) answers without keep-alive. This client holds ``CONNECTIONS``
keep-alive HTTP/1.1 connections in one process with ``selectors``, sends
the next request on a connection as soon as the previous answer is in, and
prints ``{"requests": n, "errors": n, "seconds": s}``. Errors are answers
of 400 and above, and requests still unanswered at the end after waiting
longer than :data:`_STALLED` (a server that stopped answering a connection
must not pass for one that merely served fewer requests). Run two of them for
16 connections on two cores.

``python -I -S _rate.py HOST PORT PATH METHOD ACCEPT SECONDS CONNECTIONS``
(standard library only).
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
import time

_MAX_CONNECTIONS = 256
# A request unanswered for this long when the run ends counts as an error;
# one sent just before the end is only in flight.
_STALLED = 1.0


class _Connection:
    def __init__(self, address: tuple[str, int], request: bytes) -> None:
        self.sock = socket.create_connection(address, timeout=10)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.request = request
        self.buffer = b""
        self.sent_at = 0.0

    def send(self) -> None:
        # A request of a few hundred bytes always fits an empty send buffer.
        self.sock.send(self.request)
        self.sent_at = time.monotonic()

    def receive(self, head_only: bool) -> int | None:
        """Reads what arrived; returns a status once a whole response is in."""
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed a keep-alive connection")
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = self.buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        total = end + 4 + (0 if head_only else length)
        if len(self.buffer) < total:
            return None
        self.buffer = self.buffer[total:]
        return int(head[0].split(" ", 2)[1])


def main() -> int:
    host, port, path, method, accept = sys.argv[1:6]
    seconds, count = float(sys.argv[6]), min(int(sys.argv[7]), _MAX_CONNECTIONS)
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {accept}\r\n"
        "User-Agent: tcr-mirror-bench-rate/1\r\n\r\n"
    ).encode()
    selector = selectors.DefaultSelector()
    connections = [_Connection((host, int(port)), request) for _ in range(count)]
    for connection in connections:
        selector.register(connection.sock, selectors.EVENT_READ, connection)

    requests = errors = 0
    start = time.monotonic()
    deadline = start + seconds
    for connection in connections:
        connection.send()
    while (now := time.monotonic()) < deadline:
        for key, _ in selector.select(timeout=deadline - now):
            connection = key.data
            status = connection.receive(method == "HEAD")
            if status is None:
                continue
            requests += 1
            errors += status >= 400
            connection.send()
    end = time.monotonic()
    elapsed = end - start
    errors += sum(end - c.sent_at > _STALLED for c in connections)
    for connection in connections:
        connection.sock.close()
    print(json.dumps({"requests": requests, "errors": errors, "seconds": elapsed}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
