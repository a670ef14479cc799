"""Garbage in over a real socket: the node mirror answers in HTTP, or hangs up.

The daemon runs in-process (``run_node`` in a trio nursery, on a thread of
its own) in front of an upstream that answers 404 to everything. Hypothesis
writes request heads -- methods, targets, headers and bodies, well-formed and
not -- and raw bytes; each is sent over TCP whole or cut into pieces. Whatever
arrives, the mirror must answer with well-formed HTTP/1.1 (parsed here by h11
as a client): never a 500, an error status with an OCI error document, or a
closed connection; never a hang, never a crash. After every example the
daemon still answers ``GET /v2/``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h11
import pytest
import trio
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tcr_mirror.proxy._config import NodeConfig, make_upstream
from tcr_mirror.proxy._daemon import run_node

# Every read from the mirror is bounded by this; a request that reaches no
# upstream takes milliseconds, so running into it means the mirror hung.
READ_TIMEOUT = 10.0
START_TIMEOUT = 20.0
NOT_FOUND = b'{"errors":[{"code":"NAME_UNKNOWN","message":"nothing here"}]}'
BLOB = bytes(range(256)) * 40
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()
SHA256 = "sha256:" + "0123456789abcdef" * 4
SHA512 = "sha512:" + "fedcba9876543210" * 8

FUZZ = settings(
    max_examples=120,
    derandomize=True,
    deadline=None,
    database=None,
    # No shrinking: a failure is reported as found, and the file stays fast.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- the daemon and its upstream ---------------------------------------------


def _upstream_answer(method: bytes, target: bytes) -> tuple[int, str, bytes]:
    """Status, content type and body the test upstream gives for a request."""
    path = target.decode("ascii").partition("?")[0]
    if path.endswith(f"/blobs/{BLOB_DIGEST}"):
        return 200, "application/octet-stream", BLOB
    if path.endswith(("/manifests/latest", f"/manifests/{MANIFEST_DIGEST}")):
        return 200, MANIFEST_TYPE, MANIFEST
    return 404, "application/json", NOT_FOUND


async def _serve_upstream(stream: trio.SocketStream) -> None:
    """Serve BLOB and MANIFEST, and 404 to everything else, keep-alive."""
    connection = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    async with stream:
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                connection.receive_data(data)
                if not data and connection.their_state is h11.IDLE:
                    return
                continue
            if isinstance(event, h11.Request):
                request = event
            if isinstance(event, h11.ConnectionClosed):
                return
            if not isinstance(event, h11.EndOfMessage):
                continue
            assert request is not None
            status, media_type, body = _upstream_answer(request.method, request.target)
            headers = [("Content-Type", media_type), ("Content-Length", str(len(body)))]
            if body is MANIFEST:
                headers.append(("Docker-Content-Digest", MANIFEST_DIGEST))
            answer = connection.send(h11.Response(status_code=status, headers=headers))
            if request.method != b"HEAD":
                answer += connection.send(h11.Data(body))
            await stream.send_all(answer + connection.send(h11.EndOfMessage()))
            if connection.our_state is not h11.DONE:
                return  # the client asked to close (blob GETs do)
            connection.start_next_cycle()


class Daemon:
    """``run_node`` on a thread with its own trio run; restarted after a crash."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = 0
        self.crash: BaseException | None = None
        self.starts = 0
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def ensure_running(self) -> None:
        if self.alive:
            return
        self.starts += 1
        self.crash = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(started,), name="mirror", daemon=True
        )
        self._thread.start()
        if not started.wait(START_TIMEOUT):
            raise RuntimeError(f"the mirror did not start: {self.crash!r}")

    def _run(self, started: threading.Event) -> None:
        try:
            trio.run(self._main, started)
        except BaseException as exc:
            self.crash = exc
            started.set()

    async def _main(self, started: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._cancel = nursery.cancel_scope
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            upstream_port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, _serve_upstream, listeners)
            config = NodeConfig(
                listen=("127.0.0.1", 0),
                data_dir=self.data_dir / f"run{self.starts}",
                upstreams=(
                    make_upstream(
                        None, f"http://127.0.0.1:{upstream_port}", default=True
                    ),
                ),
            )
            _, self.port = await nursery.start(run_node, config)
            started.set()

    def wait_ended(self) -> None:
        """Give a crashed daemon's thread time to end, so it is restarted."""
        if self._thread is not None:
            self._thread.join(START_TIMEOUT)

    def stop(self) -> None:
        if not self.alive or self._token is None or self._cancel is None:
            return
        trio.from_thread.run_sync(self._cancel.cancel, trio_token=self._token)
        assert self._thread is not None
        self._thread.join(START_TIMEOUT)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    mirror = Daemon(tmp_path_factory.mktemp("fuzz-node"))
    mirror.ensure_running()
    yield mirror
    mirror.stop()


# -- a client that speaks raw bytes and judges the answer --------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def request_methods(data: bytes) -> list[str]:
    """The methods of the requests h11 finds in ``data``, in order.

    A response to HEAD has no body whatever its Content-Length, so the
    client-side parser must know which answers are to a HEAD.
    """
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
    server.receive_data(data)
    methods: list[str] = []
    try:
        for _ in range(64):
            event = server.next_event()
            if isinstance(event, h11.Request):
                methods.append(event.method.decode("ascii"))
            elif isinstance(event, h11.EndOfMessage):
                server.send(h11.Response(status_code=200, headers=[("a", "b")]))
                server.send(h11.EndOfMessage())
                server.start_next_cycle()
            elif not isinstance(event, h11.Data):
                break
    except (h11.RemoteProtocolError, h11.LocalProtocolError):
        pass
    return methods


def send_pieces(sock: socket.socket, data: bytes, cuts: list[int] | None) -> None:
    """Send ``data`` whole, or in pieces ending at ``cuts``, pausing between."""
    if cuts is None:
        sock.sendall(data)
        return
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if start < cut <= len(data):
            sock.sendall(data[start:cut])
            # A pause lets the mirror read each piece on its own.
            time.sleep(0.0005)
            start = cut


def exchange(
    port: int,
    data: bytes,
    *,
    cuts: list[int] | None = None,
    half_close: bool = True,
    wanted: int | None = None,
) -> list[Answer]:
    """Send ``data`` and read answers until EOF (or ``wanted`` answers).

    Raises ``pytest.fail`` when the mirror sends malformed HTTP or hangs.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            send_pieces(sock, data, cuts)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:
            # The mirror may hang up before reading everything (a head too
            # large, say; EPIPE, ECONNRESET or ENOTCONN); what it said
            # before that is still judged.
            pass
        return read_answers(sock, request_methods(data), wanted, data)


def read_answers(
    sock: socket.socket, methods: list[str], wanted: int | None, sent: bytes
) -> list[Answer]:
    client = h11.Connection(h11.CLIENT)
    answers: list[Answer] = []
    deadline = time.monotonic() + READ_TIMEOUT
    _expect_answer(client, methods, 0)
    head: h11.Response | None = None
    body = bytearray()
    for _ in range(100_000):
        try:
            event = client.next_event()
        except h11.RemoteProtocolError as exc:
            pytest.fail(f"malformed HTTP from the mirror ({exc}) for {sent[:300]!r}")
        if event is h11.NEED_DATA:
            if wanted is not None and len(answers) >= wanted:
                return answers
            data = _receive(sock, deadline, sent)
            if data is None or (not data and _between_answers(client)):
                # The mirror hung up (or reset) between two answers.
                return answers
            client.receive_data(data)
        elif isinstance(event, h11.Response):
            head, body = event, bytearray()
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            answers.append(Answer(head.status_code, list(head.headers), bytes(body)))
            if client.their_state is not h11.DONE:
                continue
            client.start_next_cycle()
            _expect_answer(client, methods, len(answers))
        elif isinstance(event, h11.ConnectionClosed):
            return answers
    pytest.fail("the mirror sent an endless stream of events")


def _between_answers(client: h11.Connection) -> bool:
    unparsed, _ = client.trailing_data
    return client.their_state is h11.SEND_RESPONSE and not unparsed


def _expect_answer(client: h11.Connection, methods: list[str], index: int) -> None:
    method = methods[index] if index < len(methods) else "GET"
    client.send(h11.Request(method=method, target="/", headers=[("Host", "fuzz")]))
    client.send(h11.EndOfMessage())


def _receive(sock: socket.socket, deadline: float, sent: bytes) -> bytes | None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        pytest.fail(f"the mirror hung on {sent[:300]!r}")
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        pytest.fail(f"the mirror hung on {sent[:300]!r}")
    except ConnectionResetError:
        return None


def check_answers(answers: list[Answer], methods: list[str], sent: bytes) -> None:
    for index, answer in enumerate(answers):
        method = methods[index] if index < len(methods) else "GET"
        context = f"{answer.status} to {method} in {sent[:300]!r}"
        assert answer.status != 500, context
        assert 200 <= answer.status < 600, context
        if answer.status >= 400 and method != "HEAD":
            check_oci_error(answer, context)
        if method == "GET" and answer.status < 300:
            check_content(answer, context)


def check_content(answer: Answer, context: str) -> None:
    """A blob or manifest answered is the upstream's bytes, or the range asked."""
    headers = dict(answer.headers)
    digest = headers.get(b"docker-content-digest", b"").decode()
    if digest == MANIFEST_DIGEST:
        assert answer.body == MANIFEST, context
    if digest != BLOB_DIGEST:
        return
    if answer.status == 200:
        assert answer.body == BLOB, context
        return
    assert answer.status == 206, context
    span, _, size = (
        headers[b"content-range"].decode().removeprefix("bytes ").partition("/")
    )
    first, _, last = span.partition("-")
    assert int(size) == len(BLOB), context
    assert answer.body == BLOB[int(first) : int(last) + 1], context


def check_oci_error(answer: Answer, context: str) -> None:
    headers = dict(answer.headers)
    assert headers.get(b"content-type") == b"application/json", context
    document = json.loads(answer.body)
    errors = document["errors"]
    assert isinstance(errors, list), context
    assert errors, context
    for error in errors:
        assert isinstance(error["code"], str), context
        assert error["code"], context
        assert isinstance(error["message"], str), context


def check_healthy(daemon: Daemon) -> None:
    request = b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
    statuses = []
    if daemon.alive:
        with contextlib.suppress(OSError):
            answers = exchange(daemon.port, request, half_close=False)
            statuses = [answer.status for answer in answers]
    if statuses != [200]:
        daemon.wait_ended()
        pytest.fail(f"the mirror stopped answering; it crashed with {daemon.crash!r}")


# -- what hypothesis writes ---------------------------------------------------

_WORDS = [
    "app", "team", "library", "a", "x" * 300, "A", "..", ".", "%2F", "%2f",
    "%2e%2e", "%00", "a..b", "a__b", "a---b", "-a", "a-", "_", "é", "ü",
    "\u202e", "日本", "", "manifests", "blobs", "uploads", "tags", "list",
]  # fmt: skip
_REFERENCES = [
    "latest", BLOB_DIGEST, MANIFEST_DIGEST, "v1", "v1.2.3", ".hidden", "..",
    "-", "a" * 129, "a" * 128,
    SHA256, SHA512, SHA256.upper(), SHA256[:-1], SHA256 + "0", "sha256:",
    "md5:" + "0" * 32, "sha256:" + "g" * 64, "sha256:../../../etc/passwd",
    "sha256:%2e%2e", "sha256+b64:abc=", ":", "::", "%2F", "é", "latest%00",
]  # fmt: skip
_RANGES = [
    "bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=-", "bytes=5-1",
    "bytes=0-99999999999999999999999", "bytes=1-2,3-4", "bytes=abc", "bytes",
    "items=0-1", "bytes=\u0661-\u0662", "bytes= 1 - 2 ", "bytes=-9223372036854775808",
    "", "=", "bytes=0-0,", "BYTES=0-0",
]  # fmt: skip
_ACCEPTS = [
    "*/*", "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json;q=0.5, */*;q=0.1",
    "application/vnd.oci.image.manifest.v1+json, text/é",
    "application/vnd.oci.image.manifest.v1+json, \u00ff", ",,,", ";", "",
]  # fmt: skip

_text = st.text(max_size=24)
_word = st.sampled_from(_WORDS) | st.text(alphabet="az09._-/%A:", max_size=12)
_reference = st.sampled_from(_REFERENCES) | _text
_name = st.lists(_word, min_size=0, max_size=4).map("/".join)
_api = st.one_of(
    st.builds("manifests/{}".format, _reference),
    st.builds("blobs/{}".format, _reference),
    st.builds("referrers/{}".format, _reference),
    st.sampled_from(["tags/list", "blobs/uploads/", "blobs/uploads/abc", ""]),
)
_query_pair = st.tuples(
    st.sampled_from(["ns", "n", "last", "artifactType", "x", ""]) | _text,
    st.sampled_from(["", "docker.io", "10001", "-1", "%zz", "%ff%fe", "v1"]) | _text,
)
_query = st.lists(_query_pair, max_size=3).map(
    lambda pairs: "&".join(f"{key}={value}" for key, value in pairs)
)


@st.composite
def targets(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["api", "api", "api", "base", "other", "long"]))
    if kind == "base":
        path = draw(st.sampled_from(["/v2/", "/v2", "/v2//", "/v1/", "/", "*"]))
    elif kind == "other":
        path = draw(_text)
    elif kind == "long":
        path = "/v2/" + "a/" * draw(st.integers(100, 9000)) + "manifests/v1"
    else:
        path = f"/v2/{draw(_name)}/{draw(_api)}"
    query = draw(_query)
    return f"{path}?{query}" if query else path


_header = st.one_of(
    st.tuples(st.just("Range"), st.sampled_from(_RANGES) | _text),
    st.tuples(st.just("Accept"), st.sampled_from(_ACCEPTS) | _text),
    st.tuples(
        st.sampled_from(["Connection", "Expect", "Transfer-Encoding"]),
        st.sampled_from(["close", "keep-alive", "100-continue", "chunked", "gzip"]),
    ),
    st.tuples(st.just("Content-Length"), st.sampled_from(["0", "3", "-1", "x", ""])),
    st.tuples(st.just("X-Big"), st.integers(0, 20_000).map(lambda n: "b" * n)),
    st.tuples(st.text(alphabet="abcXYZ-_:é ", min_size=0, max_size=8), _text),
)


@dataclass(frozen=True)
class Head:
    data: bytes
    complete: bool


@st.composite
def requests(draw: st.DrawFn) -> Head:
    methods = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"]
    method = draw(st.sampled_from([*methods, "get", "GÉT", "", "G T"]) | _text)
    version = draw(
        st.sampled_from(["HTTP/1.1"] * 6 + ["HTTP/1.0", "HTTP/2", "HTTP/9.9"])
    )
    headers: list[tuple[str, str]] = []
    if draw(st.booleans()) or draw(st.booleans()):
        headers.append(("Host", draw(st.sampled_from(["mirror", "", "a b"]))))
    headers += draw(st.lists(_header, max_size=4))
    if draw(st.booleans()) and headers:
        headers.append(draw(st.sampled_from(headers)))
    body = draw(st.binary(max_size=64))
    lines = [f"{method} {draw(targets())} {version}"]
    lines += [f"{name}: {value}" for name, value in headers]
    data = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8") + body
    # Only a plain GET or HEAD with no body framing is sure to be answered
    # while the client keeps its side open.
    plain = version == "HTTP/1.1" and method in ("GET", "HEAD") and not body
    framing = {name.lower() for name, _ in headers} & {
        "content-length",
        "transfer-encoding",
        "expect",
    }
    return Head(data, plain and not framing)


def _cuts(size: int) -> st.SearchStrategy[list[int] | None]:
    bytewise = list(range(1, min(size, 400)))
    return st.one_of(
        st.none(),
        st.just(bytewise),
        st.lists(st.integers(1, max(1, size)), max_size=12),
    )


# -- the properties -------------------------------------------------------------


@FUZZ
@given(data=st.data(), head=requests(), twice=st.booleans())
def test_request_heads_are_answered_in_http(
    daemon: Daemon, data: st.DataObject, head: Head, twice: bool
) -> None:
    daemon.ensure_running()
    sent = head.data * 2 if twice else head.data
    cuts = data.draw(_cuts(len(sent)), label="cuts")
    methods = request_methods(sent)
    answers = exchange(daemon.port, sent, cuts=cuts)
    check_answers(answers, methods, sent)
    check_healthy(daemon)


@FUZZ
@given(data=st.data(), head=requests())
def test_a_whole_request_is_answered_on_an_open_connection(
    daemon: Daemon, data: st.DataObject, head: Head
) -> None:
    """Without a half-close the answer must come anyway: no hang waiting."""
    daemon.ensure_running()
    methods = request_methods(head.data)
    if not head.complete or len(methods) != 1:
        check_healthy(daemon)
        return
    cuts = data.draw(_cuts(len(head.data)), label="cuts")
    answers = exchange(daemon.port, head.data, cuts=cuts, half_close=False, wanted=1)
    assert len(answers) == 1, f"no answer to {head.data[:300]!r}"
    check_answers(answers, methods, head.data)
    check_healthy(daemon)


_odd_value = st.text(
    alphabet=st.characters(
        min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"
    ),
    max_size=40,
).map(str.strip)
_pull_target = st.tuples(
    st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True),
    st.sampled_from(
        [
            "manifests/latest",
            f"manifests/{MANIFEST_DIGEST}",
            f"manifests/{SHA256}",
            f"blobs/{BLOB_DIGEST}",
            f"blobs/{SHA256}",
            "tags/list",
            f"referrers/{MANIFEST_DIGEST}",
        ]
    ),
    st.sampled_from(["", "?n=1", "?last=a", "?artifactType=x", "?ns=other"]),
).map(lambda parts: f"/v2/{parts[0]}/{parts[1]}{parts[2]}")
_odd_range = st.tuples(
    st.sampled_from(["bytes=", "bytes= ", "Bytes="]),
    st.integers(0, 2 * len(BLOB)).map(str) | _odd_value,
    st.sampled_from(["-", "", "--", ","]),
    st.integers(0, 2 * len(BLOB)).map(str) | _odd_value,
).map("".join)
_fresh = itertools.count()
_odd_accept = st.tuples(st.sampled_from(_ACCEPTS), _odd_value).map(", ".join)


@FUZZ
@given(
    method=st.sampled_from(["GET", "HEAD"]),
    target=_pull_target,
    headers=st.tuples(
        st.tuples(st.just("Accept"), _odd_accept | st.sampled_from(_ACCEPTS)),
        st.tuples(st.just("Range"), _odd_range | st.sampled_from(_RANGES)),
        st.tuples(st.sampled_from(["If-None-Match", "User-Agent", "X-A"]), _odd_value),
    ).flatmap(lambda three: st.lists(st.sampled_from(three), max_size=3)),
)
def test_valid_pulls_with_odd_header_values(
    daemon: Daemon, method: str, target: str, headers: list[tuple[str, str]]
) -> None:
    """Requests that pass every parser and reach the store and the upstream."""
    daemon.ensure_running()
    # A repository of its own, so that no tag is cached from another example.
    target = target.replace("/v2/", f"/v2/x{next(_fresh)}/", 1)
    lines = [f"{method} {target} HTTP/1.1", "Host: mirror"]
    lines += [f"{name}: {value}" for name, value in headers]
    sent = b"".join(_wire(line) + b"\r\n" for line in [*lines, ""])
    answers = exchange(daemon.port, sent, half_close=False, wanted=1)
    assert len(answers) == 1, f"no answer to {sent[:300]!r}"
    check_answers(answers, [method], sent)
    check_healthy(daemon)


def _wire(text: str) -> bytes:
    # Latin-1 where it can (one byte a character, as h11 decodes), else UTF-8.
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


_VALID = (
    b"GET /v2/app/blobs/" + SHA256.encode() + b" HTTP/1.1\r\nHost: mirror\r\n"
    b"Range: bytes=0-9\r\nAccept: */*\r\n\r\n"
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(_VALID)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        piece = draw(st.binary(min_size=1, max_size=4))
        if action == "insert":
            data[at:at] = piece
        elif action == "delete":
            del data[at : at + len(piece)]
        else:
            data[at : at + len(piece)] = piece
    return bytes(data)


@FUZZ
@given(data=st.data(), raw=st.binary(max_size=600) | mutated())
def test_raw_bytes_are_answered_in_http_or_hung_up_on(
    daemon: Daemon, data: st.DataObject, raw: bytes
) -> None:
    daemon.ensure_running()
    cuts = data.draw(_cuts(len(raw)), label="cuts")
    answers = exchange(daemon.port, raw, cuts=cuts)
    check_answers(answers, request_methods(raw), raw)
    check_healthy(daemon)


@pytest.mark.parametrize(
    "sent",
    [
        # A body announced and never finished.
        b"POST /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\n\r\nab",
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 5\r\n\r\n",
        # A chunked body that is not chunked.
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"PUT /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: m\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nab",
    ],
    ids=["content-length-cut", "get-with-cut-body", "bad-chunk", "cut-chunk"],
)
def test_a_broken_request_body_closes_only_its_connection(
    daemon: Daemon, sent: bytes
) -> None:
    daemon.ensure_running()
    # Several times: the server does not always read the body before the
    # client's half-close arrives, and this is about the times it does.
    for _ in range(5):
        answers = exchange(daemon.port, sent)
        check_answers(answers, request_methods(sent), sent)
        check_healthy(daemon)
    # A crash may still be on its way out of the daemon's nursery.
    time.sleep(0.2)
    assert daemon.alive, f"the mirror crashed: {daemon.crash!r}"


def test_the_mirror_serves_well_after_the_fuzzing(daemon: Daemon) -> None:
    """Known answers, so the properties above cannot pass on a mirror that
    answers nothing at all."""
    daemon.ensure_running()
    blob = f"GET /v2/app/blobs/{SHA256} HTTP/1.1\r\nHost: m\r\n\r\n".encode()
    write = (
        b"PUT /v2/app/manifests/v1 HTTP/1.1\r\nHost: m\r\nContent-Length: 2\r\n\r\n{}"
    )
    bad = b"GET /v2/app/manifests/..%2F HTTP/1.1\r\nHost: m\r\n\r\n"
    statuses = []
    for sent in (blob, write, bad, b"\x16\x03\x01\x02\x00\r\n\r\n"):
        answers = exchange(daemon.port, sent)
        check_answers(answers, request_methods(sent), sent)
        statuses.append([answer.status for answer in answers])
    assert statuses == [[404], [405], [400], [400]]
    check_healthy(daemon)
