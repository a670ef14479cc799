"""The benchmark's own measuring code (loadtest/), run against real servers.

No timing is asserted: these tests check what the benchmark counts and
how it fails, not how fast anything is.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from support.registry import REGISTRY_BINARY, free_port

_LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"
sys.path.insert(0, str(_LOADTEST))

import _load  # noqa: E402
import _servers  # noqa: E402
import bench_node  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[bench_node.Bench]:
    """A started benchmark (upstream and nginx) with small blobs."""
    if not Path(REGISTRY_BINARY).exists():
        pytest.skip(f"{REGISTRY_BINARY} is not installed")
    sizes = bench_node.Sizes(
        big=MIB, mid=256 * MIB, repeats=1, warm_repeats=1, rate_seconds=1,
        tag_seconds=1, huge=None,
    )  # fmt: skip
    with ExitStack() as stack:
        started = bench_node.Bench(tmp_path, sizes, stack)
        started.start()
        yield started


def test_fanout_counts_the_proxy_registrys_own_store_get(
    bench: bench_node.Bench,
) -> None:
    # The proxy registry streams each client from a GET of its own and
    # stores the blob from one more in the background, which can still run
    # when the clients are done: the published row once said 32, not 33.
    blob = bench.upstream.blobs["mid"]
    proxy = bench.new_proxy()
    clients = 8

    _, gets, sent = bench_node.fanout_round(bench, proxy, blob, clients)

    assert gets == clients + 1
    assert sent == (clients + 1) * blob.size


def test_fanout_counts_the_mirrors_single_get(bench: bench_node.Bench) -> None:
    blob = bench.upstream.blobs["mid"]
    mirror = bench.new_mirror()

    _, gets, sent = bench_node.fanout_round(bench, mirror, blob, 4)

    assert (gets, sent) == (1, blob.size)


def test_a_client_that_cannot_connect_is_one_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(RuntimeError) as raised:
        _load.fetch_group(free_port(), "/v2/", 2, 0)

    assert "ConnectionRefusedError" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert "Traceback" not in capfd.readouterr().err


def test_a_rate_client_that_cannot_connect_is_one_line(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(RuntimeError) as raised:
        _load.run_rate_clients(free_port(), "/v2/", seconds=1)

    assert "ConnectionRefusedError" in str(raised.value)
    assert "Traceback" not in capfd.readouterr().err


def test_a_tag_run_with_no_answer_does_not_pass() -> None:
    hung = {"client_requests": 0, "upstream": 0, "errors": 0, "rate": 0.0}
    good = {"client_requests": 20_000, "upstream": 2, "errors": 0, "rate": 4e3}
    many = {"client_requests": 100, "upstream": 11, "errors": 0, "rate": 20.0}

    assert not bench_node.tag_passed(hung)
    assert bench_node.tag_passed(good)
    assert not bench_node.tag_passed(many)


def test_a_rate_run_with_no_answer_does_not_pass() -> None:
    none = {"mirror": 0, "proxy": 0}

    assert not bench_node.rate_passed({"mirror": 0.0, "proxy": 0.0}, none)
    assert bench_node.rate_passed({"mirror": 4e3, "proxy": 1e3}, none)
    assert not bench_node.rate_passed(
        {"mirror": 4e3, "proxy": 1e3}, {**none, "mirror": 1}
    )


def test_requests_left_unanswered_count_as_rate_errors() -> None:
    # A server that takes connections and requests but never answers.
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                held.append(listener.accept()[0])

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        result = _load.run_rate_clients(
            listener.getsockname()[1], "/v2/", connections=4, processes=2, seconds=2
        )
    finally:
        listener.close()
        for sock in held:
            sock.close()

    assert result.errors == 4
    assert not bench_node.rate_passed(
        {"mirror": result.rate, "proxy": 0.0}, {"mirror": result.errors, "proxy": 0}
    )


@pytest.mark.parametrize(
    "option",
    [["--workdir", "/nonexistent/bench"], ["--json", "/nonexistent/out.json"]],
)
def test_a_bad_path_option_is_one_line(option: list[str]) -> None:
    command = [sys.executable, str(_LOADTEST / "bench_node.py"), "--quick", *option]

    done = subprocess.run(command, capture_output=True, text=True, timeout=60)

    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1
    assert option[0] in done.stderr


def test_a_failure_is_reported_on_one_line() -> None:
    error = RuntimeError("tcr-mirror node exited: {}\n{}\n")

    assert bench_node.one_line(error) == "RuntimeError: tcr-mirror node exited: {} | {}"


def test_curl_reference_checks_the_size_it_got(
    bench: bench_node.Bench, tmp_path: Path
) -> None:
    twin = _servers.tls_twin(bench.upstream, tmp_path / "tls-upstream")
    twin.start()
    try:
        assert twin.tls is not None
        blob = bench.upstream.blobs["big"]
        url = twin.url + blob.api_path

        assert bench_node.curl_rate(url, twin.tls.ca, blob.size) > 0
        with pytest.raises(RuntimeError, match="got 1048576 of 1048577 bytes"):
            bench_node.curl_rate(url, twin.tls.ca, blob.size + 1)
    finally:
        twin.stop()
