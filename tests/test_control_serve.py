"""control serve: renewal schedule (virtual time) and the credentials endpoint."""

from __future__ import annotations

import logging
import random
import time

import httpx
import pytest
import trio

from tcr_mirror.control import CallRecord, TcrError
from tcr_mirror.control._serve import (
    ControlMetrics,
    Credential,
    CredentialsServer,
    RenewalSchedule,
    TokenKeeper,
    run,
)

HOST = "demo.tencentcloudcr.com"
SECRET = "node-secret-QUUX"


# --- schedule (sans-IO) --------------------------------------------------


def test_schedule_is_due_at_once() -> None:
    assert RenewalSchedule().delay(12345.0) == 0.0


def test_schedule_renews_at_two_thirds_of_life() -> None:
    schedule = RenewalSchedule()

    assert schedule.issued(100.0, 3600.0) == pytest.approx(2500.0)
    assert schedule.expires_at == 3700.0
    assert schedule.delay(1000.0) == pytest.approx(1500.0)


def test_schedule_backs_off_and_resets_after_success() -> None:
    schedule = RenewalSchedule(backoff_base=1.0, backoff_cap=8.0)

    delays = [schedule.failed(0.0) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]

    schedule.issued(10.0, 60.0)
    assert schedule.failures == 0
    assert schedule.failed(20.0) == 21.0


def test_schedule_jitter_only_shortens() -> None:
    schedule = RenewalSchedule(backoff_base=10.0, jitter=0.5, rng=random.Random(7))

    for _ in range(20):
        schedule.failures = 0
        assert 5.0 <= schedule.failed(0.0) <= 10.0


def test_schedule_retries_soon_when_token_arrives_expired() -> None:
    schedule = RenewalSchedule(backoff_base=3.0)

    assert schedule.issued(50.0, -5.0) == 53.0


def test_schedule_backs_off_when_tokens_keep_arriving_expired() -> None:
    schedule = RenewalSchedule(backoff_base=1.0, backoff_cap=8.0)

    delays = [schedule.issued(0.0, -5.0) for _ in range(5)]

    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert schedule.expires_at is None


def test_schedule_rejects_bad_fraction() -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        RenewalSchedule(renew_fraction=1.5)


# --- keeper (virtual time) -----------------------------------------------


class ScriptedIssuer:
    """Issues one-hour tokens; fails the calls whose numbers are in ``fail``."""

    def __init__(self, fail: set[int] = frozenset(), lifetime: float = 3600.0):
        self.fail = fail
        self.lifetime = lifetime
        self.calls: list[float] = []

    async def __call__(self, host: str) -> Credential:
        number = len(self.calls)
        self.calls.append(trio.current_time())
        await trio.sleep(0.5)  # TCR takes a moment to answer
        if number in self.fail:
            raise TcrError("InternalError", "try again", request_id=f"r{number}")
        expires = time.time() + self.lifetime
        return Credential(host, "100012345678", f"token-{number}", expires)


async def test_keeper_renews_before_expiry_and_retries_failures(
    autojump_clock: trio.testing.MockClock,
) -> None:
    issuer = ScriptedIssuer(fail={0, 1})
    keeper = TokenKeeper([HOST], issuer)
    start = trio.current_time()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(5000)
        nursery.cancel_scope.cancel()

    offsets = [t - start for t in issuer.calls]
    # Each answer takes 0.5 s. Fail at 0 (retry 1 s after the answer),
    # fail at 1.5 (retry 2 s after), succeed at 4.0; the token arrives at
    # 4.5 with an hour to live, so renew at 4.5 + 2400, then likewise.
    assert offsets == pytest.approx([0.0, 1.5, 4.0, 2404.5, 4805.0], abs=0.05)
    credential = keeper.get(HOST)
    assert credential is not None
    assert credential.password == "token-4"
    assert keeper.schedules[HOST].failures == 0


async def test_keeper_keeps_old_token_while_renewal_fails(
    autojump_clock: trio.testing.MockClock,
) -> None:
    issuer = ScriptedIssuer(fail=set(range(1, 100)))
    metrics = ControlMetrics()
    keeper = TokenKeeper([HOST], issuer, metrics=metrics)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(3000)
        nursery.cancel_scope.cancel()

    credential = keeper.get(HOST)
    assert credential is not None
    assert credential.password == "token-0"
    # Backoff capped at 60 s: about ten tries in the 600 s after 2400 s.
    assert 8 <= len(issuer.calls) - 1 <= 15
    text = metrics.render().decode()
    assert "tcr_mirror_control_token_expiry_timestamp_seconds" in text


async def test_keeper_backs_off_when_tcr_answers_expired_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    issuer = ScriptedIssuer(lifetime=-30.0)  # the host clock runs ahead of TCR
    keeper = TokenKeeper([HOST], issuer)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.run)
        await trio.sleep(600)
        nursery.cancel_scope.cancel()

    assert keeper.get(HOST) is None
    # Backoff capped at 60 s: about fifteen tries, not one a second.
    assert len(issuer.calls) <= 20
    assert keeper.schedules[HOST].failures == len(issuer.calls)


# --- HTTP endpoint (in process, real sockets) ----------------------------


async def start_server(
    nursery: trio.Nursery, keeper: TokenKeeper, **options: object
) -> str:
    addresses: dict[str, str] = {}
    await nursery.start(_run_until_ready, keeper, addresses, options)
    return f"http://{addresses['listen']}"


async def _run_until_ready(
    keeper: TokenKeeper,
    addresses: dict[str, str],
    options: dict[str, object],
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    def ready(bound: dict[str, str]) -> None:
        addresses.update(bound)
        task_status.started()

    await run(keeper, SECRET, ("127.0.0.1", 0), on_ready=ready, **options)  # type: ignore[arg-type]


async def test_endpoint_answers_per_contract() -> None:
    gate = trio.Event()
    issuer = ScriptedIssuer()

    async def gated(host: str) -> Credential:
        await gate.wait()
        return await issuer(host)

    keeper = TokenKeeper([HOST], gated)
    auth = {"Authorization": f"Bearer {SECRET}"}
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, keeper)
        async with httpx.AsyncClient(base_url=base) as http:
            url = f"/v1/credentials?registry={HOST}"
            early = await http.get(url, headers=auth)
            assert (early.status_code, early.json()) == (503, {"error": "no token yet"})

            gate.set()
            for _ in range(100):
                if keeper.get(HOST) is not None:
                    break
                await trio.sleep(0.05)

            good = await http.get(url, headers=auth)
            assert good.status_code == 200
            body = good.json()
            assert set(body) == {"registry", "username", "password", "expires_at"}
            assert (body["registry"], body["password"]) == (HOST, "token-0")
            assert isinstance(body["expires_at"], float)

            bad = await http.get(url, headers={"Authorization": "Bearer nope"})
            assert (bad.status_code, bad.json()) == (401, {"error": "unauthorized"})
            missing = await http.get(url)
            assert missing.status_code == 401
            unknown = await http.get("/v1/credentials?registry=x.io", headers=auth)
            assert (unknown.status_code, unknown.json()) == (
                404,
                {"error": "unknown registry"},
            )
            assert (await http.get("/healthz")).status_code == 200
            metrics = await http.get("/metrics")
            assert "tcr_mirror_control_token_last_renewal" in metrics.text
            assert "token-0" not in metrics.text
        nursery.cancel_scope.cancel()


async def test_metrics_on_their_own_port() -> None:
    keeper = TokenKeeper([HOST], ScriptedIssuer())
    addresses: dict[str, str] = {}

    async with trio.open_nursery() as nursery:

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            def ready(bound: dict[str, str]) -> None:
                addresses.update(bound)
                task_status.started()

            await run(
                keeper,
                SECRET,
                ("127.0.0.1", 0),
                metrics_listen=("127.0.0.1", 0),
                on_ready=ready,
            )

        await nursery.start(serve)
        async with httpx.AsyncClient() as http:
            main = f"http://{addresses['listen']}"
            side = f"http://{addresses['metrics']}"
            assert (await http.get(f"{main}/metrics")).status_code == 404
            assert (await http.get(f"{side}/metrics")).status_code == 200
            auth = {"Authorization": f"Bearer {SECRET}"}
            cred = await http.get(
                f"{side}/v1/credentials?registry={HOST}", headers=auth
            )
            assert cred.status_code == 404
        nursery.cancel_scope.cancel()


async def test_expired_token_is_503_not_200() -> None:
    # One token with a moment to live, then every renewal fails.
    issuer = ScriptedIssuer(fail=set(range(1, 1000)), lifetime=0.5)
    keeper = TokenKeeper([HOST], issuer)
    auth = {"Authorization": f"Bearer {SECRET}"}
    statuses: list[int] = []
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, keeper)
        async with httpx.AsyncClient(base_url=base) as http:
            answer = None
            for _ in range(400):
                answer = await http.get(
                    f"/v1/credentials?registry={HOST}", headers=auth
                )
                statuses.append(answer.status_code)
                if keeper.get(HOST) is not None and answer.status_code != 200:
                    break
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert answer is not None
    assert 200 in statuses
    assert answer.status_code == 503, answer.text
    body = answer.json()
    assert body["error"] == "token expired"
    assert body["expires_at"] < time.time()
    assert "token-0" not in answer.text


async def _connect(base: str) -> trio.SocketStream:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def _closed_by_server(stream: trio.SocketStream, within: float) -> bool:
    """Whether the server ends the connection within ``within`` seconds,
    reading (and dropping) whatever it answers meanwhile."""
    with trio.move_on_after(within):
        try:
            while await stream.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        return True
    return False


async def test_a_trickled_request_is_cut_off_as_a_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tcr_mirror.control._serve._READ_TIMEOUT", 0.5)
    keeper = TokenKeeper([HOST], ScriptedIssuer())
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, keeper)
        stream = await _connect(base)
        closed = trio.Event()

        async def watch() -> None:
            if await _closed_by_server(stream, 10):
                closed.set()

        nursery.start_soon(watch)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # Each byte well within the per-read timeout, the whole far past it.
        for _ in range(100):
            if closed.is_set():
                break
            try:
                await stream.send_all(b"X-Slow: 1\r\n")
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.1)
        assert closed.is_set()
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_a_request_body_past_the_limit_is_refused() -> None:
    keeper = TokenKeeper([HOST], ScriptedIssuer())
    async with trio.open_nursery() as nursery:
        base = await start_server(nursery, keeper)
        stream = await _connect(base)
        head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n"
        # Past the limit, but all of it read before the server closes: a
        # close with bytes unread would reset the connection, answer and all.
        await stream.send_all(head + b"x" * 70_000)
        answer = b""
        with trio.move_on_after(5):
            while chunk := await stream.receive_some(65536):
                answer += chunk
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 413 "), answer


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "Bearer  "])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    keeper = TokenKeeper([HOST], ScriptedIssuer())
    server = CredentialsServer(keeper, SECRET)
    target = f"/v1/credentials?registry={HOST}"

    status, _, _ = server.respond("GET", target, f"{scheme} {SECRET}".encode())

    assert status == 503  # past the secret check: no token yet
    for wrong in (f"Basic {SECRET}", SECRET, f"Bearer{SECRET}", f"Bearer {SECRET}x"):
        assert server.respond("GET", target, wrong.encode())[0] == 401


def test_respond_is_sans_io() -> None:
    keeper = TokenKeeper([HOST], ScriptedIssuer())
    server = CredentialsServer(keeper, SECRET)

    status, _, body = server.respond("POST", "/v1/credentials", b"Bearer x")
    assert (status, body) == (405, b'{"error": "method not allowed"}')
    assert server.respond("GET", "/nope", None)[0] == 404
    with pytest.raises(ValueError, match="empty"):
        CredentialsServer(keeper, "")


# --- against the simulator -----------------------------------------------


async def test_sim_tokens_reach_nodes_and_log_in(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from support.control_sim import SECRET_KEY, sim_in_process

    caplog.set_level(logging.DEBUG)
    from tcr_mirror.control._serve import resolve_registries, tcr_issuer

    async with sim_in_process() as sim:
        rid = sim.simulator.add_instance("serve-one")
        metrics = ControlMetrics()
        async with sim.client(on_call=metrics.on_call) as client:
            registries = await resolve_registries(client, [rid])
            host = "serve-one.tencentcloudcr.com"
            assert registries == {host: rid}
            keeper = TokenKeeper(
                [host], tcr_issuer(client, registries), metrics=metrics
            )
            async with trio.open_nursery() as nursery:
                base = await start_server(nursery, keeper)
                async with httpx.AsyncClient() as http:
                    body = await poll_credentials(http, base, host)
                    assert body["username"] == "100012345678"
                    assert body["expires_at"] > time.time() + 3000

                    # The token is a real instance token: the simulator's
                    # registry token service accepts it as a docker login.
                    login = await http.get(
                        f"{sim.endpoint}/service/token",
                        params={
                            "service": "harbor-registry",
                            "scope": "repository:a/b:pull",
                        },
                        auth=(body["username"], body["password"]),
                    )
                    assert login.status_code == 200, login.text

                    bad = await http.get(
                        f"{base}/v1/credentials",
                        params={"registry": host},
                        headers={"Authorization": f"Bearer {SECRET}x"},
                    )
                    assert bad.status_code == 401
                    assert body["password"] not in bad.text

                    text = (await http.get(f"{base}/metrics")).text
                    counter = (
                        "tcr_mirror_control_api_calls_total"
                        '{action="CreateInstanceToken",code="OK"} 1.0'
                    )
                    assert counter in text
                    assert body["password"] not in text
                nursery.cancel_scope.cancel()
    assert "token_renewed" in caplog.text
    for secret in (str(body["password"]), SECRET_KEY, SECRET):
        assert secret not in caplog.text


async def poll_credentials(
    http: httpx.AsyncClient, base: str, host: str, *, unlike: str = ""
) -> dict[str, object]:
    """Poll the endpoint (bounded) until it has a token other than ``unlike``."""
    for _ in range(200):
        answer = await http.get(
            f"{base}/v1/credentials",
            params={"registry": host},
            headers={"Authorization": f"Bearer {SECRET}"},
        )
        if answer.status_code == 200 and answer.json()["password"] != unlike:
            return answer.json()  # type: ignore[no-any-return]
        assert answer.status_code in (200, 503), answer.text
        await trio.sleep(0.05)
    raise AssertionError("no (new) token within the polling bound")


async def test_renewed_token_is_seen_by_a_polling_node() -> None:
    from support.control_sim import sim_in_process
    from tcr_mirror.control._serve import tcr_issuer

    async with sim_in_process() as sim:
        rid = sim.simulator.add_instance("serve-two")
        host = "serve-two.tencentcloudcr.com"
        async with sim.client() as client:
            # Renew after 0.02% of the hour, about 0.7 s, to see it happen.
            keeper = TokenKeeper(
                [host],
                tcr_issuer(client, {host: rid}),
                schedule=lambda: RenewalSchedule(renew_fraction=0.0002),
            )
            async with trio.open_nursery() as nursery:
                base = await start_server(nursery, keeper)
                async with httpx.AsyncClient() as http:
                    first = await poll_credentials(http, base, host)
                    second = await poll_credentials(
                        http, base, host, unlike=str(first["password"])
                    )
                assert second["expires_at"] >= first["expires_at"]
                assert keeper.renewals >= 2
                nursery.cancel_scope.cancel()


async def test_renewal_failure_is_retried_against_the_sim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """TCR refusing twice costs two backoff steps, then the token arrives."""
    from support.control_sim import sim_in_process
    from tcr_mirror.control._serve import tcr_issuer

    # Virtual time with real sockets: only the scheduler's sleeps are long,
    # and the client has no timeout shorter than the jumps we make.
    async with sim_in_process() as sim:
        rid = sim.simulator.add_instance("serve-three")
        host = "serve-three.tencentcloudcr.com"
        sim.simulator.state.inject("CreateInstanceToken", "InternalError", times=2)
        calls: list[str | None] = []

        def on_call(call: CallRecord) -> None:
            calls.append(None if call.error is None else call.error.code)

        async with sim.client(timeout=10_000, on_call=on_call) as client:
            keeper = TokenKeeper([host], tcr_issuer(client, {host: rid}))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(keeper.run)
                for _ in range(100):
                    if keeper.get(host) is not None:
                        break
                    await trio.sleep(1)
                nursery.cancel_scope.cancel()
    assert keeper.get(host) is not None
    assert keeper.schedules[host].failures == 0
    assert calls == ["InternalError", "InternalError", None]
