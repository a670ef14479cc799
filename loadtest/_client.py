"""One benchmark client: a raw-socket HTTP/1.1 reader, run as its own process.

``python -I -S _client.py HOST PORT PATH [METHOD [OUTPUT]]`` connects, prints
``ready``, waits for a line on stdin (so that many clients start at the same
moment), sends one request and reads the whole body into a reused 4 MiB
buffer; with OUTPUT it also writes the body into that new file, as a cache
would (the floor for any cache on this machine). It prints one JSON line:
status, body bytes, the monotonic start and end times, and the CPU seconds
the transfer cost this process
(``CLOCK_MONOTONIC`` is shared by all processes, so the parent can take the
wall time of a group as last end minus first start).

Only the standard library, and no ``site``, so 32 of them start quickly;
on this machine it reads faster than ``curl -o /dev/null``.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time

_BUFFER = 4 << 20
# Per-recv timeout: a cold fetch of a big blob may hold its last byte back
# while the mirror verifies and syncs the file.
_TIMEOUT = 600.0


def _read_head(sock: socket.socket, view: memoryview) -> tuple[int, int, bytes]:
    """Reads the response head; returns (status, content length, body bytes read)."""
    head = b""
    for _ in range(1000):
        count = sock.recv_into(view)
        if not count:
            raise ConnectionError("connection closed before the response head")
        head += bytes(view[:count])
        if b"\r\n\r\n" in head:
            break
    else:
        raise ConnectionError("response head too long")
    raw, _, rest = head.partition(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return status, length, rest


def main() -> int:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    method = sys.argv[4] if len(sys.argv) > 4 else "GET"
    output = (
        os.open(sys.argv[5], os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        if len(sys.argv) > 5
        else None
    )
    sock = socket.create_connection((host, port), timeout=_TIMEOUT)
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    print("ready", flush=True)
    sys.stdin.readline()

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    request = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "User-Agent: tcr-mirror-bench/1\r\nConnection: close\r\n\r\n"
    )
    sock.sendall(request.encode())
    status, length, early_body = _read_head(sock, view)
    received = len(early_body)
    if method == "HEAD":
        length = received
    if output is not None:
        os.write(output, early_body)
    while received < length:
        count = sock.recv_into(view)
        if not count:
            break
        received += count
        if output is not None:
            os.write(output, view[:count])
    end = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_SELF)
    sock.close()
    if output is not None:
        os.close(output)

    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result = {
        "status": status,
        "bytes": received,
        "start": start,
        "end": end,
        "cpu": cpu,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
