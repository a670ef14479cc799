"""The TCR simulator on 127.0.0.1, in process or as ``tcr-mirror sim``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass

import trio

from tcr_mirror.control import CloudCredentials, TcrClient
from tcr_mirror.control.sim._app import Simulator
from tcr_mirror.control.sim._http import serve_http
from tcr_mirror.control.sim._state import SimConfig
from tcr_mirror.control.sim._verify import Key

from .processes import stop_process

SECRET_ID = "AKIDcontroltest0000"
SECRET_KEY = "control-test-key-NEVER-PRINT-7f3a"
CREDENTIALS = CloudCredentials(SECRET_ID, SECRET_KEY)


@dataclass
class RunningSim:
    simulator: Simulator
    endpoint: str

    def client(self, **options: object) -> TcrClient:
        return TcrClient(
            CREDENTIALS,
            region="ap-guangzhou",
            endpoint=self.endpoint,
            max_attempts=1,
            **options,  # type: ignore[arg-type]
        )


@asynccontextmanager
async def sim_in_process(**config: float) -> AsyncIterator[RunningSim]:
    """A simulator served from this trio run; background delays default to 0."""
    settings = {"deploy_seconds": 0.0, "delete_seconds": 0.0, "endpoint_seconds": 0.0}
    settings.update(config)
    simulator = Simulator(
        {SECRET_ID: Key(SECRET_KEY)}, config=SimConfig(**settings), seed=1
    )
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, simulator.handle, "127.0.0.1", 0)
        host, port = listeners[0].socket.getsockname()[:2]
        yield RunningSim(simulator, f"http://{host}:{port}")
        nursery.cancel_scope.cancel()


def sim_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(TENCENTCLOUD_SECRET_ID=SECRET_ID, TENCENTCLOUD_SECRET_KEY=SECRET_KEY)
    env.pop("TCR_MIRROR_AUDIT_LOG", None)
    env.pop("TCR_MIRROR_ENDPOINT", None)
    return env


@contextmanager
def sim_process(*instances: str) -> Iterator[dict[str, object]]:
    """``tcr-mirror sim`` as a subprocess; yields its announcement line."""
    command = [sys.executable, "-m", "tcr_mirror", "sim", "--listen", "127.0.0.1:0"]
    command += ["--deploy-seconds", "0"]
    for name in instances:
        command += ["--instance", name]
    proc = subprocess.Popen(
        command, env=sim_env(), stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    drain: threading.Thread | None = None
    try:
        assert proc.stderr is not None
        announcement: dict[str, object] = {}
        for _ in range(50):
            line = proc.stderr.readline()
            if not line:
                break
            event = json.loads(line)
            if event.get("event") == "sim_listening":
                announcement = event
                break
        assert announcement, "the simulator did not announce its address"
        # Keep reading its log so a full pipe never blocks the simulator.
        drain = threading.Thread(target=proc.stderr.read, daemon=True)
        drain.start()
        yield announcement
    finally:
        stop_process(proc, drain=drain)
