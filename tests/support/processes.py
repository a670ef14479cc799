"""Ending the processes that tests start (servers, registries, proxies)."""

from __future__ import annotations

import subprocess
import threading
from typing import Any

__all__ = ["stop_process"]


def stop_process(
    process: subprocess.Popen[Any],
    *,
    terminate: bool = True,
    drain: threading.Thread | None = None,
) -> None:
    """End ``process`` and reap it, then join ``drain`` and close stderr.

    SIGTERM first (SIGKILL straight away without ``terminate``), and SIGKILL
    if it lingers for 10 s. ``drain`` is a thread reading its stderr.
    """
    if process.poll() is None:
        if terminate:
            process.terminate()
        else:
            process.kill()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if drain is not None and drain.ident is not None:
        drain.join(timeout=10)
    if process.stderr is not None:
        process.stderr.close()
