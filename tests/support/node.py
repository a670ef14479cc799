"""The node mirror as the tests run it: a real ``tcr-mirror node`` process.

The process listens on 127.0.0.1 port 0 and says where in its
``node_listening`` log event; its JSON log lines go to a file that tests
read (and search for secrets).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["NodeFactory", "NodeProcess"]

_START_TIMEOUT = 20.0


class NodeProcess:
    """``tcr-mirror node`` in a subprocess, with its log in ``log_path``.

    Args:
        data_dir: The blob store directory.
        args: Further command-line arguments (``--upstream``, ...).
    """

    def __init__(self, data_dir: Path, args: list[str], *, log_path: Path) -> None:
        self.data_dir = data_dir
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> NodeProcess:
        command = [
            sys.executable, "-m", "tcr_mirror", "node",
            "--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir),
            "--log-level", "debug", *self.args,
        ]  # fmt: skip
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            for event in self.events(offset):
                if event.get("event") == "node_listening":
                    self.host, port = event["address"].rsplit(":", 1)
                    self.port = int(port)
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"tcr-mirror node exited: {self.log_text()[-2000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("tcr-mirror node did not start in time")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, and return the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def temp_file_heads(self, length: int) -> dict[str, bytes]:
        """The first ``length`` bytes of each temporary file, by blob hex.

        A fetch claims its blob's whole size up front, so a temporary
        file's length tells nothing of how far the fetch got; its bytes do.
        """
        heads = {}
        for path in (self.data_dir / "tmp").glob("*"):
            # A file renamed into the store or removed meanwhile is left out.
            with contextlib.suppress(FileNotFoundError), path.open("rb") as file:
                heads[path.name.split(".", 1)[0]] = file.read(length)
        return heads

    def log_text(self) -> str:
        return (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )

    def events(self, offset: int = 0) -> list[dict[str, Any]]:
        """Every JSON log event written since byte ``offset`` of the log."""
        if not self.log_path.exists():
            return []
        with self.log_path.open("rb") as log:
            log.seek(offset)
            lines = log.read().splitlines()
        events = []
        for line in lines:
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def events_named(self, name: str, offset: int = 0) -> list[dict[str, Any]]:
        """The JSON log events called ``name`` written since byte ``offset``."""
        return [e for e in self.events(offset) if e.get("event") == name]


NodeFactory = Callable[..., NodeProcess]
"""The type of the ``node_factory`` fixture and of the per-file ones wrapping it."""
