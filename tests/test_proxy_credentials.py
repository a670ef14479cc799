"""Credentials from the control plane: renewal, outages and expiry."""

from __future__ import annotations

import contextlib
import json
import time

import h11
import pytest
import trio

from support.loopback import LoopbackServer
from tcr_mirror.proxy._credentials import ControlPlaneCredentials
from tcr_mirror.proxy._errors import UpstreamUnavailable

SECRET = "node-secret-for-tests"
REGISTRY = "demo.tencentcloudcr.com"


class FakeControlPlane:
    """Answers /v1/credentials like ``tcr-mirror control serve``."""

    def __init__(self) -> None:
        self.password = "token-1"
        self.expires_at = time.time() + 3600
        self.status = 200
        self.requests: list[tuple[str, str]] = []
        self.url = ""

    async def serve(self, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await stream.receive_some(65536))
                continue
            if not isinstance(event, h11.Request):
                return
            headers = dict(event.headers)
            self.requests.append(
                (event.target.decode(), headers.get(b"authorization", b"").decode())
            )
            body = json.dumps(
                {"registry": REGISTRY, "username": "100012345678",
                 "password": self.password, "expires_at": self.expires_at}
            ).encode()  # fmt: skip
            if self.status != 200:
                body = b'{"error": "no token yet"}'
            head = h11.Response(
                status_code=self.status,
                headers=[("Content-Length", str(len(body))), ("Connection", "close")],
            )
            await stream.send_all(
                connection.send(head) + connection.send(h11.Data(body))
                + connection.send(h11.EndOfMessage())
            )  # fmt: skip
            await stream.aclose()
            return


async def test_renewal_outage_and_expiry() -> None:
    control = FakeControlPlane()
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        source = ControlPlaneCredentials(
            control.url, REGISTRY, SECRET, refresh=0.2, retry=0.2
        )
        try:
            first = await source.credentials()
            assert first is not None
            assert (first.username, first.password) == ("100012345678", "token-1")
            target, authorization = control.requests[0]
            assert target == f"/v1/credentials?registry={REGISTRY}"
            assert authorization == f"Bearer {SECRET}"

            # Within the refresh period the control plane is not asked again.
            await source.credentials()
            assert len(control.requests) == 1

            control.password = "token-2"
            await trio.sleep(0.3)
            renewed = await source.credentials()
            assert renewed is not None
            assert renewed.password == "token-2"

            # An outage keeps the last credentials while they are valid...
            control.status = 503
            await trio.sleep(0.3)
            kept = await source.credentials()
            assert kept is not None
            assert kept.password == "token-2"

            # ...and refuses once they have expired.
            control.status = 200
            control.expires_at = time.time() - 1
            await trio.sleep(0.3)  # past the retry delay after the failure
            with pytest.raises(UpstreamUnavailable):
                await source.credentials()
            assert "token-2" not in repr(source)
        finally:
            await source.aclose()
        nursery.cancel_scope.cancel()


async def test_an_expiry_past_any_float_is_malformed_not_a_crash() -> None:
    """float() of a JSON integer of 400 digits raises OverflowError, which
    ended the renewal task and with it the whole node."""
    control = FakeControlPlane()
    control.expires_at = 10**400
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        source = ControlPlaneCredentials(control.url, REGISTRY, SECRET, retry=3600)
        try:
            with trio.move_on_after(60) as keeper:
                nursery.start_soon(source.keep_fresh)
                while not control.requests:
                    await trio.sleep(0.01)
                with pytest.raises(UpstreamUnavailable):
                    await source.credentials()
            assert not keeper.cancelled_caught
        finally:
            await source.aclose()
        nursery.cancel_scope.cancel()


class TricklingControlPlane(LoopbackServer):
    """Answers with a head that never ends, one byte at a time."""

    def __init__(self) -> None:
        self.requests = 0

    async def _connection(self, stream: trio.SocketStream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.receive_some(65536)
            self.requests += 1
            head = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 2000
            for byte in range(len(head)):  # about 400 s in all: bounded
                await stream.send_all(head[byte : byte + 1])
                await trio.sleep(0.2)


async def test_a_control_plane_trickling_its_answer_cannot_hold_a_pull() -> None:
    """Each byte comes within httpx's per-read timeout; the request as a
    whole must still end within the timeout."""
    control = TricklingControlPlane()
    async with trio.open_nursery() as nursery:
        await nursery.start(control.serve)
        source = ControlPlaneCredentials(
            f"http://127.0.0.1:{control.port}", REGISTRY, SECRET, timeout=0.5
        )
        try:
            with trio.fail_after(60), pytest.raises(UpstreamUnavailable):
                await source.credentials()
        finally:
            await source.aclose()
        nursery.cancel_scope.cancel()
    assert control.requests == 1
