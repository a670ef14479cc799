"""Randomized fault soak of the node mirror: many faults at once, invariants.

Run ``.venv/bin/python loadtest/soak_node.py [--seconds 120] [--seed N]``
(``--tmpfs-mib N``, as root: the data directory on a tmpfs that fills up).
Everything runs on 127.0.0.1 in a temporary directory removed at the end:
docker-registry (upstream) <- FaultProxy <- ``tcr-mirror node`` <- clients.
Client threads pull blobs (whole, ranged, cut short), HEADs and manifests
while the main thread arms random proxy faults, SIGKILLs and restarts the
node on the same data directory, and restarts the upstream. It exits 0 when
every invariant held, else 1 with one line per violated invariant (see
``loadtest/README.md``). Not part of the test suite: it takes minutes and
its outcome depends on timing; ``tests/test_loadtest_soak.py`` covers the
checker only.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx
import lmdb

from tcr_mirror.proxy._errors import StoreFull

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support import faultproxy  # noqa: E402
from support.faultproxy import Fault, FaultKind, FaultProxy  # noqa: E402
from support.images import PushedImage, push_image, push_large_image  # noqa: E402
from support.node import NodeProcess  # noqa: E402
from support.registry import Registry  # noqa: E402

# A SIGKILLed node resets its idle connections to the proxy, and the
# proxy's socketserver prints a traceback for each: noise, not a finding.
faultproxy._Server.handle_error = lambda *_: None  # type: ignore[method-assign]

KIB, MIB = 1 << 10, 1 << 20
# 5xx a client may see: the upstream is down or broken, or the store is full.
OK_5XX = frozenset({502, 503, 504, 507})
# 429 is the upstream's own rate limit passed on; other 4xx are wrong here,
# since every request names a blob or manifest the upstream holds.
OK_4XX = frozenset({429})
# Past --seconds: clients finish their request, the node drains, checks run.
GRACE = 60.0
# The smallest --tmpfs-mib: the largest blob (64 MiB) must fit beside the
# index, which is in the data directory too, or no final pull could pass.
MIN_TMPFS_MIB = 72
CLIENT_TIMEOUT = httpx.Timeout(connect=3, read=20, write=10, pool=10)


# -- the invariants (sans IO: tests/test_loadtest_soak.py feeds it) ----------


def status_violation(method: str, status: int, body: bytes) -> str | None:
    """What is wrong with an answer's status (and error body), if anything."""
    if status in (200, 206) or status in OK_4XX:
        return None
    if status not in OK_5XX:
        return f"status {status}"
    if method == "HEAD":
        return None  # no body to hold the error JSON
    try:
        errors = json.loads(body).get("errors")
    except (ValueError, AttributeError):
        errors = None
    if not isinstance(errors, list) or not errors:
        return f"status {status} without OCI error JSON: {body[:80]!r}"
    code = errors[0].get("code") if isinstance(errors[0], dict) else None
    if status == StoreFull.status and code != StoreFull.code:
        return f"status {status} with code {code!r}, not {StoreFull.code}"
    return None


def index_violations(entries: dict[str, int], files: dict[str, int]) -> list[str]:
    """Where the index (blob key -> size) and the blob files disagree."""
    problems = [
        f"{key}: indexed with {size} B, file has {files.get(key, 'none')}"
        for key, size in sorted(entries.items())
        if files.get(key) != size
    ]
    problems += [f"{key}: file not indexed" for key in sorted(files.keys() - entries)]
    return problems


class Checker:
    """Collects violations by invariant; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.found: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.faults: list[Fault] = []  # armed so far, to count those applied

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def violation(self, invariant: str, detail: str) -> None:
        with self._lock:
            self.found.setdefault(invariant, []).append(detail)
        print(f"VIOLATION {invariant}: {detail}", file=sys.stderr, flush=True)

    def answer(self, request: str, method: str, status: int, body: bytes) -> None:
        problem = status_violation(method, status, body)
        self.count(f"{method} {status}")
        if problem is not None:
            self.violation("status", f"{request}: {problem}")

    def body(self, request: str, complete: bool, wrong_at: int | None) -> None:
        """A GET body: ``wrong_at`` is the offset of its first wrong byte."""
        self.count("complete" if complete else "incomplete")
        if complete and wrong_at is not None:
            self.violation("bytes", f"{request}: complete body, byte {wrong_at} wrong")

    def summary(self) -> list[str]:
        """One line per violated invariant: count and first example."""
        with self._lock:
            return [
                f"{name}: {len(found)} violation(s), first: {found[0]}"
                for name, found in sorted(self.found.items())
            ]


# -- what the upstream holds -----------------------------------------------


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    path: Path  # our copy of its bytes, to compare any slice against
    repo: str


@dataclass(frozen=True)
class Manifest:
    repo: str
    tag: str
    digest: str
    media_type: str
    body: bytes


def seed_upstream(
    registry: Registry, workdir: Path
) -> tuple[list[Blob], list[Manifest]]:
    """Pushes three images, blobs from 4 KiB to 64 MiB; returns what it pushed.

    They hold about 125 MiB, more than the node's default budget, so blobs
    keep being evicted and fetched again: faults only meet cache misses.
    """
    files = workdir / "blobs"
    files.mkdir()
    images: list[PushedImage] = [
        push_image(registry, "soak/small", "v1", layer_sizes=(4 * KIB, 48 * KIB)),
        push_image(registry, "soak/mid", "v1",
                   layer_sizes=(700 * KIB, 3 * MIB, 8 * MIB)),
        push_large_image(registry, "soak/big", "v1",
                         layer_sizes=(16 * MIB, 32 * MIB, 64 * MIB), workdir=files),
    ]  # fmt: skip
    blobs, manifests = [], []
    for image in images:
        held = [(image.config_digest, image.config_bytes), *image.layers]
        for digest, data in held:
            path = files / digest.split(":")[1]
            path.write_bytes(data)
            blobs.append(Blob(digest, len(data), path, image.repo))
        for layer in image.layer_files:
            blobs.append(Blob(layer.digest, layer.size, layer.path, image.repo))
        assert image.tag is not None
        manifests.append(Manifest(image.repo, image.tag, image.manifest_digest,
                                  image.media_type, image.manifest_bytes))  # fmt: skip
    return blobs, manifests


class Comparer:
    """Compares a body, chunk by chunk as it comes, with a slice of a file
    (never holding a 64 MiB body); ``wrong_at`` is its first wrong byte."""

    def __init__(self, path: Path, offset: int) -> None:
        self._file = path.open("rb")
        self._file.seek(offset)
        self.received = 0
        self.wrong_at: int | None = None

    def feed(self, chunk: bytes) -> None:
        expected = self._file.read(len(chunk))
        if self.wrong_at is None and expected != chunk:
            index = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(expected, chunk, strict=False))
                    if a != b
                ),
                min(len(expected), len(chunk)),
            )
            self.wrong_at = self.received + index
        self.received += len(chunk)

    def close(self) -> None:
        self._file.close()


# -- the node behind the fault proxy --------------------------------------


class Node:
    """The node and the URL clients use (None while it is down)."""

    def __init__(self, data_dir: Path, log: Path, args: list[str]) -> None:
        self.process = NodeProcess(data_dir, args, log_path=log)
        self._lock = threading.Lock()
        self._url: str | None = None
        self.restarts = 0

    @property
    def url(self) -> str | None:
        with self._lock:
            return self._url

    def start(self, checker: Checker) -> None:
        log = self.process.log_path
        offset = log.stat().st_size if log.exists() else 0
        self.process.start()
        # Clients learn the new port only below, so no fetch can have made a
        # temporary file yet: whatever is in tmp/ survived recovery.
        if not self.process.events_named("store_recovered", offset):
            checker.violation("recovery", "no store_recovered event at start")
        left = sorted(p.name for p in (self.process.data_dir / "tmp").glob("*"))
        if left:
            checker.violation("recovery", f"tmp/ not empty after recovery: {left}")
        # Recovery makes the index and the files agree, unless (a full disk)
        # it logged an index write it could not make.
        excused = ("blob_not_indexed", "index_write_failed")
        if not any(self.process.events_named(name, offset) for name in excused):
            problems = index_violations(*read_store(self.process.data_dir))
            if problems:
                checker.violation("index", f"after recovery: {problems[:3]}")
        with self._lock:
            self._url = self.process.url

    def alive(self, checker: Checker) -> bool:
        process = self.process.process
        if self.url is None or process is None:
            return False  # down on purpose (or failed to start: reported)
        if process.poll() is not None:
            checker.violation(
                "node-exit", f"node exited on its own: {process.returncode}"
            )
            return False
        return True

    def kill(self) -> None:
        with self._lock:
            self._url = None
        self.process.kill()

    def terminate(self, checker: Checker) -> None:
        """SIGTERM: the node drains (--drain-timeout 3) and exits with 0."""
        with self._lock:
            self._url = None
        try:
            status = self.process.stop(timeout=30)
        except subprocess.TimeoutExpired:
            checker.violation("drain", "node still running 30 s after SIGTERM")
            return
        if status != 0:
            checker.violation("drain", f"node exited with {status} after SIGTERM")


def read_store(data_dir: Path) -> tuple[dict[str, int], dict[str, int]]:
    """The index's blob sizes and the blob files' sizes, by ``alg:hex``.

    The index is read through LMDB's lock, so the node may be running.
    """
    entries = {}
    with lmdb.open(str(data_dir / "index"), readonly=True, max_dbs=4) as env:
        db = env.open_db(b"blobs", create=False)
        with env.begin(db=db) as txn:
            for key, record in txn.cursor():
                entries[key.decode()] = int.from_bytes(record[:8], "little")
    files = {
        f"{path.parent.parent.name}:{path.name}": path.stat().st_size
        for path in (data_dir / "blobs").glob("*/*/*")
    }
    return entries, files


def check_blob_files(data_dir: Path, checker: Checker) -> int:
    """With the node stopped: every stored blob has the digest its name says."""
    checked = 0
    for path in sorted((data_dir / "blobs").glob("*/*/*")):
        hasher = hashlib.new(path.parent.parent.name)
        with path.open("rb") as file:
            while chunk := file.read(4 * MIB):
                hasher.update(chunk)
        if hasher.hexdigest() != path.name:
            checker.violation("store", f"{path.relative_to(data_dir)} has other bytes")
        checked += 1
    return checked


# -- clients ---------------------------------------------------------------


def client(
    rng: random.Random,
    node: Node,
    blobs: list[Blob],
    manifests: list[Manifest],
    checker: Checker,
    until: float,
) -> None:
    """Random requests until ``until``; transport errors are expected."""
    with httpx.Client(timeout=CLIENT_TIMEOUT, trust_env=False) as http:
        while time.monotonic() < until:
            url = node.url
            if url is None:
                time.sleep(0.2)  # the node is being restarted
                continue
            try:
                if rng.random() < 0.75:
                    blob_request(rng, http, url, rng.choice(blobs), checker, until)
                else:
                    manifest_request(rng, http, url, rng.choice(manifests), checker)
            except httpx.HTTPError:
                checker.count("transport error")
                time.sleep(rng.uniform(0, 0.2))


def blob_request(
    rng: random.Random,
    http: httpx.Client,
    url: str,
    blob: Blob,
    checker: Checker,
    until: float,
) -> None:
    method = "HEAD" if rng.random() < 0.2 else "GET"
    first, last = 0, blob.size - 1
    headers = {}
    if rng.random() < 0.4:
        # The three forms of a single range: first-last, first-, -suffix.
        first = rng.randrange(blob.size)
        last = min(blob.size - 1, first + rng.randrange(4 * MIB))
        form = rng.randrange(3)
        if form == 0:
            headers["Range"] = f"bytes={first}-{last}"
        else:
            last = blob.size - 1
            suffix = f"-{blob.size - first}" if form == 2 else f"{first}-"
            headers["Range"] = f"bytes={suffix}"
    ranged = "Range" in headers
    request = f"{method} {blob.digest[:19]} ({blob.size} B) {headers.get('Range', '')}"
    # Some clients hang up mid-body, which must not hurt anyone else.
    hang_up_at = rng.randrange(last - first + 1) if rng.random() < 0.15 else None
    path = f"{url}/v2/{blob.repo}/blobs/{blob.digest}"
    with http.stream(method, path, headers=headers) as response:
        status = response.status_code
        if status not in (200, 206):
            checker.answer(request, method, status, response.read())
            return
        checker.answer(request, method, status, b"")
        if status == 200:
            first, last = 0, blob.size - 1
        elif not ranged or response.headers.get("content-range") != (
            f"bytes {first}-{last}/{blob.size}"
        ):
            checker.violation("range", f"{request}: 206 {response.headers}")
            return
        length = int(response.headers.get("content-length", -1))
        if length != last - first + 1:
            checker.violation("length", f"{request}: Content-Length {length}")
            return
        if method == "HEAD":
            return
        comparer = Comparer(blob.path, first)
        try:
            for chunk in response.iter_raw():
                comparer.feed(chunk)
                if hang_up_at is not None and comparer.received >= hang_up_at:
                    break
                if time.monotonic() > until + GRACE / 2:
                    break  # bounded even if the node trickles
        except httpx.HTTPError:
            pass  # cut short: allowed, as long as it is not complete
        finally:
            comparer.close()
        complete = comparer.received == length
        checker.body(request, complete, comparer.wrong_at)


def manifest_request(
    rng: random.Random,
    http: httpx.Client,
    url: str,
    manifest: Manifest,
    checker: Checker,
) -> None:
    reference = manifest.tag if rng.random() < 0.5 else manifest.digest
    method = "HEAD" if rng.random() < 0.2 else "GET"
    request = f"{method} manifest {manifest.repo}:{reference[:19]}"
    response = http.request(
        method,
        f"{url}/v2/{manifest.repo}/manifests/{reference}",
        headers={"Accept": manifest.media_type},
    )
    checker.answer(request, method, response.status_code, response.content)
    if response.status_code != 200:
        return
    if response.headers.get("docker-content-digest") != manifest.digest:
        checker.violation("manifest", f"{request}: digest {response.headers}")
    if method == "GET":
        complete = len(response.content) == len(manifest.body)
        wrong = None if response.content == manifest.body else 0
        checker.body(request, complete, wrong)


# -- faults ----------------------------------------------------------------


def random_faults(rng: random.Random) -> list[Fault]:
    """A fault for the next 1-3 matching requests to the upstream.

    A wrong or ignored Range only meets the node's resume of a cut body,
    so it comes after a cut of its own.
    """
    kind = rng.choice(list(FaultKind))
    fault = Fault(kind, times=rng.randint(1, 3), seconds=rng.uniform(0.5, 8))
    fault.path_contains = rng.choice(["/blobs/", "/blobs/", "/manifests/", "/v2/"])
    if kind is FaultKind.REDIRECT:
        # Registries redirect blobs to storage; the proxy's storage listener
        # drops Accept, for which docker-registry 404s an OCI manifest.
        fault.path_contains = "/blobs/"
    if kind in (FaultKind.STATUS, FaultKind.CLOSE, FaultKind.STALL_HEAD):
        fault.methods = rng.choice([frozenset({"GET"}), frozenset({"GET", "HEAD"})])
    if kind in (FaultKind.CUT, FaultKind.STALL_BODY):
        # Mostly within the blob: a cut past its end changes nothing.
        fault.after = rng.choice([0, rng.randrange(64 * KIB), rng.randrange(8 * MIB)])
    if kind is FaultKind.STATUS:
        fault.status = rng.choice([500, 502, 503, 429])
        if fault.status == 429:
            fault.headers = (("Retry-After", str(rng.randint(0, 2))),)
    if kind in (FaultKind.WRONG_RANGE, FaultKind.IGNORE_RANGE):
        cut = Fault(FaultKind.CUT, times=fault.times, after=rng.randrange(MIB))
        return [cut, fault]
    return [fault]


def chaos(
    rng: random.Random,
    until: float,
    node: Node,
    upstream: Registry,
    proxy: FaultProxy,
    checker: Checker,
) -> None:
    """Random faults, node kills and upstream restarts until ``until``."""
    data_dir = node.process.data_dir
    while time.monotonic() < until:
        time.sleep(rng.uniform(0.1, 1.5))
        if not node.alive(checker):
            return  # nothing more to learn from a dead node
        action = rng.random()
        # Mostly faults: a kill or an upstream restart takes seconds.
        if action < 0.75:
            for _ in range(rng.randint(1, 3)):
                for fault in random_faults(rng):
                    proxy.add_fault(fault)
                    checker.faults.append(fault)
                    kind, where = fault.kind.value, fault.path_contains
                    log(f"fault {kind} {where} x{fault.times}")
        elif action < 0.8:
            proxy.clear_faults()
        elif action < 0.9:
            how = "killed"
            if rng.random() < 0.7:
                node.kill()
            else:
                how = "drained"
                node.terminate(checker)
            checked = check_blob_files(data_dir, checker)
            log(f"node {how}; {checked} blob files checked; restarting")
            try:
                node.start(checker)
            except RuntimeError as exc:
                checker.violation("restart", str(exc)[-300:].replace("\n", " | "))
                return
            node.restarts += 1
        else:
            log("upstream restart")
            upstream.stop()
            time.sleep(rng.uniform(0, 2))
            upstream.start()


def final_pull(node: Node, blobs: list[Blob], checker: Checker) -> None:
    """Faults off: every blob must come whole and right, within 5 tries
    (a fetch a gone client left running may hold the budget for a while)."""
    url = node.url
    assert url is not None
    with httpx.Client(timeout=CLIENT_TIMEOUT, trust_env=False) as http:
        for blob in blobs:
            for _ in range(5):
                path = f"{url}/v2/{blob.repo}/blobs/{blob.digest}"
                try:
                    response = http.get(path)
                except httpx.HTTPError:
                    continue
                body = response.content
                if (
                    response.status_code == 200
                    and hashlib.sha256(body).hexdigest() == (blob.digest.split(":")[1])
                ):
                    break
                time.sleep(2)
            else:
                checker.violation(
                    "final", f"{blob.digest[:19]} not served right in 5 tries"
                )


def final_checks(node: Node, checker: Checker) -> None:
    """Kill the node, check its files, and check one more recovery."""
    node.kill()
    check_blob_files(node.process.data_dir, checker)
    try:
        node.start(checker)
    except RuntimeError as exc:
        checker.violation("restart", str(exc)[-300:].replace("\n", " | "))
    node.kill()


# -- the run ---------------------------------------------------------------


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"usage error: {message} (see --help)\n")


def positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value

    parse.__name__ = kind.__name__
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=positive(float), default=120.0)
    parser.add_argument("--seed", type=int, default=None, help="default: random")
    parser.add_argument("--clients", type=positive(int), default=6)
    budget = "the node's store budget, so eviction happens; 0: no limit"
    parser.add_argument("--max-store-bytes", type=int, help=budget)
    tmpfs = "the data directory on a tmpfs of this size (as root), no budget"
    parser.add_argument("--tmpfs-mib", type=positive(int), help=tmpfs)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if args.tmpfs_mib is not None:
        if args.max_store_bytes is not None:
            parser.error("--tmpfs-mib runs without a budget: no --max-store-bytes")
        if args.tmpfs_mib < MIN_TMPFS_MIB:
            parser.error(f"--tmpfs-mib must be >= {MIN_TMPFS_MIB}")
        args.max_store_bytes = 0
    elif args.max_store_bytes is None:
        args.max_store_bytes = 96 * MIB
    if args.max_store_bytes < 0:
        parser.error("--max-store-bytes must be >= 0")
    if args.seed is None:
        args.seed = random.randrange(1 << 32)
    return args


@contextlib.contextmanager
def tmpfs(path: Path, mib: int | None) -> Iterator[None]:
    """``path`` on a tmpfs of ``mib`` MiB while inside (None: no mount);
    unmounted on the way out, lazily if still busy."""
    path.mkdir()
    if mib is None:
        yield
        return
    mount = ["mount", "-t", "tmpfs", "-o", f"size={mib}M", "tmpfs", str(path)]
    subprocess.run(mount, check=True)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)


def disk_full_counts(events: list[dict[str, object]]) -> dict[str, int]:
    """How often the node met a full disk, from its log events."""
    counts = {"space made": 0, "evicted": 0, "fetch refused, no space": 0}
    for event in events:
        name = event.get("event")
        if name == "blob_space_made":
            counts["space made"] += 1
        elif name == "blob_evicted":
            counts["evicted"] += 1
        elif name == "blob_fetch_failed" and "no space" in str(event.get("reason")):
            counts["fetch refused, no space"] += 1
    return counts


def run(args: argparse.Namespace, workdir: Path) -> Checker:
    checker = Checker()
    rng = random.Random(args.seed)
    upstream = Registry(workdir / "upstream")
    proxy: FaultProxy | None = None
    node: Node | None = None
    threads: list[threading.Thread] = []
    mounted = contextlib.ExitStack()
    try:
        upstream.start()
        blobs, manifests = seed_upstream(upstream, workdir)
        log(f"upstream {upstream.url}: {len(blobs)} blobs, {len(manifests)} manifests")
        proxy = FaultProxy(upstream.url).start()
        node_args = ["--upstream", proxy.url, "--log-level", "info", "--tag-ttl", "1",
                     "--read-timeout", "5", "--connect-timeout", "2",
                     "--drain-timeout", "3"]  # fmt: skip
        if args.max_store_bytes:
            node_args += ["--max-store-bytes", str(args.max_store_bytes)]
        mounted.enter_context(tmpfs(workdir / "data", args.tmpfs_mib))
        node = Node(workdir / "data", workdir / "node.log", node_args)
        node.start(checker)

        until = time.monotonic() + args.seconds
        for index in range(args.clients):
            client_rng = random.Random(rng.random())
            thread = threading.Thread(
                target=client,
                args=(client_rng, node, blobs, manifests, checker, until),
                name=f"client-{index}",
                daemon=True,  # a hung client must not keep the soak alive
            )
            thread.start()
            threads.append(thread)
        chaos(rng, until, node, upstream, proxy, checker)

        proxy.clear_faults()
        for thread in threads:
            thread.join(timeout=max(0.1, until + GRACE / 2 - time.monotonic()))
            if thread.is_alive():
                checker.violation("bounded", f"{thread.name} still running after grace")
        if node.alive(checker):
            final_pull(node, blobs, checker)
            final_checks(node, checker)
    finally:
        if node is not None:
            node.kill()
        mounted.close()
        if proxy is not None:
            proxy.stop()
            gets = [
                r for r in proxy.requests if r.method == "GET" and "/blobs/" in r.path
            ]
            resumes = sum(1 for r in gets if r.range)
            applied = sum(fault.applied for fault in checker.faults)
            log(f"upstream blob GETs: {len(gets)} ({resumes} ranged)")
            log(f"faults applied: {applied} of {len(checker.faults)} armed")
        upstream.stop()
    if node is not None:
        check_log(node, checker, args.tmpfs_mib)
    return checker


def check_log(node: Node, checker: Checker, tmpfs_mib: int | None) -> None:
    """No traceback in the node's log; what happened, on stderr."""
    text = node.process.log_text()
    if "Traceback" in text:
        excerpt = text[text.index("Traceback") :][:300].replace("\n", " | ")
        checker.violation("traceback", excerpt)
    if tmpfs_mib is not None:
        counts = disk_full_counts(node.process.events())
        log(f"disk full on the {tmpfs_mib} MiB tmpfs: {counts}")
    answers = dict(sorted(checker.counts.items()))
    log(f"node restarts: {node.restarts}; answers: {answers}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # All traffic stays on this host: a proxy set for the machine must not
    # reach the node, the pushes or the clients.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    # SIGTERM ends the run like Ctrl-C: the finally blocks stop every process.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    workdir = Path(tempfile.mkdtemp(prefix="tcr-soak-"))
    store = f"{args.max_store_bytes} B budget"
    if args.tmpfs_mib:
        store = f"{args.tmpfs_mib} MiB tmpfs"
    log(f"soak: seed {args.seed}, {args.seconds} s, {args.clients} clients, "
        f"{store}, {workdir}")  # fmt: skip
    try:
        checker = run(args, workdir)
    except KeyboardInterrupt:
        print("soak interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    lines = checker.summary()
    for line in lines:
        print(line)
    if not lines:
        print(f"soak passed: seed {args.seed}, {args.seconds} s")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
