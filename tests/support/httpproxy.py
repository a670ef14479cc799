"""A real HTTP forward proxy for tests: Debian's tinyproxy.

Each ``TinyProxy`` is one ``tinyproxy -d`` process on 127.0.0.1 with its own
config and log file, optionally behind Basic credentials. What it carried is
read back from its log, which at ``LogLevel Connect`` has one line per
request the proxy was asked to carry, ending in
``Request (file descriptor 5): CONNECT 127.0.0.1:18080 HTTP/1.1``.

tinyproxy 1.11 answers bad proxy credentials with ``401`` and a
``WWW-Authenticate`` header rather than ``407``; the node must cope with both.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from .processes import stop_process
from .registry import free_port

__all__ = ["TINYPROXY", "TinyProxy", "TinyProxyStartError"]

TINYPROXY = "/usr/bin/tinyproxy"
_START_TIMEOUT = 10.0
_LOG_WAIT = 5.0
_REQUEST_LINE = re.compile(r"Request \(file descriptor \d+\): (\S+) (\S+) HTTP/")


class TinyProxyStartError(RuntimeError):
    """tinyproxy did not come up; the message carries its log tail."""


class TinyProxy:
    """One tinyproxy process; use as a context manager.

    Args:
        workdir: a directory of its own (config and log go in it).
        credentials: ``(user, password)`` the proxy demands, if any.
    """

    def __init__(
        self, workdir: Path, credentials: tuple[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        self.credentials = credentials
        self.port = 0
        self.log_path = workdir / "tinyproxy.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def url(self, credentials: tuple[str, str] | None = None) -> str:
        """The proxy's URL, with ``credentials`` in it if given."""
        userinfo = f"{credentials[0]}:{credentials[1]}@" if credentials else ""
        return f"http://{userinfo}{self.address}"

    def requests(self) -> list[tuple[str, str]]:
        """``(method, target)`` of every request the proxy was asked to carry."""
        text = (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )
        # tinyproxy 1.11 writes its whole log a second time as it exits; a
        # line is one event however often it appears (each has a timestamp).
        lines = dict.fromkeys(text.splitlines())
        return [(m[1], m[2]) for line in lines if (m := _REQUEST_LINE.search(line))]

    def wait_for_requests(self, count: int) -> list[tuple[str, str]]:
        """The requests, once at least ``count`` are logged (or after a wait)."""
        deadline = time.monotonic() + _LOG_WAIT
        while len(seen := self.requests()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return seen

    def start(self) -> TinyProxy:
        if shutil.which(TINYPROXY) is None:
            raise TinyProxyStartError(f"{TINYPROXY} is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        config = self.workdir / "tinyproxy.conf"
        lines = [
            f"Port {self.port}",
            "Listen 127.0.0.1",
            "Timeout 60",
            f'LogFile "{self.log_path}"',
            "LogLevel Connect",
            "MaxClients 64",
            "Allow 127.0.0.1",
            "DisableViaHeader Yes",
        ]
        if self.credentials is not None:
            lines.append(f"BasicAuth {self.credentials[0]} {self.credentials[1]}")
        config.write_text("\n".join(lines) + "\n")
        with (self.workdir / "stderr.log").open("wb") as stderr:
            self._process = subprocess.Popen(
                [TINYPROXY, "-d", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                time.sleep(0.02)
                continue
            return self
        self.stop()
        tail = (self.workdir / "stderr.log").read_text(errors="replace")[-500:]
        raise TinyProxyStartError(f"tinyproxy did not start: {tail}")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            stop_process(process)

    def __enter__(self) -> TinyProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
