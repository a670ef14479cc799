"""Benchmark of the node mirror against nginx, the upstream and a proxy registry.

Run ``.venv/bin/python loadtest/bench_node.py [--quick] [--json PATH]``.
It starts everything it needs on 127.0.0.1 (upstream docker-registry seeded
with test blobs, nginx on the same files, docker-registry in proxy mode,
``tcr-mirror node``), measures each target of issue #3, prints a table with
each figure, its reference and PASS/FAIL, and stops every process it
started. See ``loadtest/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from _load import GroupResult, fetch_group, run_rate_clients, run_wrk
from _servers import (
    REPOSITORY,
    TAG,
    Blob,
    Mirror,
    Nginx,
    Registry,
    Upstream,
    drop_blob,
    registry_blob_file,
    tls_twin,
)

MIB = 1 << 20
GIB = 1 << 30
_RSS_LIMIT = 128 * MIB
_HUGE_FREE_NEEDED = 25 * GIB
_MANIFEST_ACCEPT = "application/vnd.oci.image.manifest.v1+json"
# Set in the benchmark's own network namespace (--congestion-control).
_NETNS_ENV = "TCR_BENCH_NETNS"
# How long a cache may take to hold a whole blob after its first GET.
_STORE_WAIT = 120.0


@dataclass(frozen=True)
class Sizes:
    big: int
    mid: int
    repeats: int
    warm_repeats: int
    rate_seconds: int
    tag_seconds: int
    huge: int | None


# Warm reads take well under a second each and swing the most from one to
# the next on this shared machine, so they get more rounds.
FULL = Sizes(big=GIB, mid=256 * MIB, repeats=3, warm_repeats=7, rate_seconds=5,
             tag_seconds=10, huge=10 * GIB)  # fmt: skip
QUICK = Sizes(big=256 * MIB, mid=64 * MIB, repeats=2, warm_repeats=3,
              rate_seconds=3, tag_seconds=5, huge=None)  # fmt: skip


@dataclass
class Row:
    """One line of the result table."""

    check: str
    mirror: str
    reference: str
    ratio: float | None
    target: str
    passed: bool | None
    values: dict[str, Any]
    informative: bool = False
    """A figure with no target of its own: shown as ``info``, not ``SKIP``."""


class Bench:
    """Holds the running servers and the rows measured so far."""

    def __init__(self, workdir: Path, sizes: Sizes, stack: ExitStack) -> None:
        self.workdir = workdir
        self.sizes = sizes
        self.stack = stack
        self.upstream = Upstream(workdir / "upstream")
        self.nginx = Nginx(workdir / "nginx")
        self.rows: list[Row] = []
        self.mirrors: list[Mirror] = []
        self._serial = 0

    # -- servers --------------------------------------------------------------

    def start(self) -> None:
        log("seeding the upstream")
        self.upstream.seed("big", self.sizes.big, seed=1)
        self.upstream.seed("mid", self.sizes.mid, seed=2)
        self.upstream.registry.start()
        self.stack.callback(self.upstream.registry.stop)
        self.upstream.push_manifest()
        self.upstream.check()
        for blob in self.upstream.blobs.values():
            self.nginx.link(blob)
        self.nginx.start()
        self.stack.callback(self.nginx.stop)

    def new_mirror(
        self, upstream_url: str | None = None, ca_file: Path | None = None
    ) -> Mirror:
        """A mirror with an empty data directory (the previous one is removed)."""
        self._serial += 1
        mirror = Mirror(
            self.workdir / f"mirror-{self._serial}",
            upstream_url or self.upstream.url,
            ca_file=ca_file,
        )
        self.stack.callback(mirror.stop)
        self.mirrors.append(mirror)
        return mirror.start()

    def retire(self, mirror: Mirror) -> None:
        mirror.stop()
        mirror.remove_data()

    def new_proxy(self) -> Registry:
        """A docker-registry in proxy mode with empty storage."""
        self._serial += 1
        proxy = Registry(
            self.workdir / f"proxy-{self._serial}", proxy_remote=self.upstream.url
        )
        proxy.start()
        self.stack.callback(proxy.stop)
        return proxy

    def retire_proxy(self, proxy: Registry) -> None:
        proxy.stop()
        shutil.rmtree(proxy.storage, ignore_errors=True)

    def warm_upstream(self, blob: Blob) -> None:
        """Readies a cold measurement: no writeback left, the blob file in RAM.

        Files written and not synced (the seeded blobs, the proxy registry's
        and the new-file reference's copies) go to disk about 30 s later,
        in whichever measurement then runs, and slow its writes to about
        half: each measurement starts with nothing left to write back.
        """
        os.sync()
        read(self.nginx.port, f"/{blob.hex}", blob.size)


def log(message: str) -> None:
    print(f"# {message}", file=sys.stderr, flush=True)


def read(port: int, path: str, size: int, clients: int = 1) -> GroupResult:
    """Reads ``path`` with ``clients`` clients at once; raises if a body is short."""
    result = fetch_group(port, path, clients, size)
    if not result.complete:
        raise RuntimeError(
            f"incomplete read of {path} on port {port}: statuses {result.statuses}"
        )
    return result


def cpu_seconds(pid: int | None) -> float:
    """User plus system CPU seconds that process ``pid`` has used so far."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def interleave(times: int, *measures: Callable[[], float]) -> list[float]:
    """The median of each measurement, taken in turns (A B A B ...).

    Other load on the machine then weighs on every server alike.
    """
    samples: list[list[float]] = [[] for _ in measures]
    for _ in range(times):
        for index, measure in enumerate(measures):
            samples[index].append(measure())
    return [median(values) for values in samples]


def mib_s(rate: float) -> str:
    return f"{rate / MIB:,.0f} MiB/s"


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else 0.0


# -- the measurements ---------------------------------------------------------


def cold_single(bench: Bench) -> Mirror:
    """One client, big blob not yet cached: mirror vs direct vs proxy registry.

    Returns the last mirror, which now holds the blob, for the warm read.
    """
    blob = bench.upstream.blobs["big"]
    log(f"cold read of {blob.size // MIB} MiB")

    def direct() -> float:
        bench.warm_upstream(blob)
        return read(bench.upstream.port, blob.api_path, blob.size).throughput

    mirror: Mirror | None = None
    cpu: dict[str, list[float]] = {"mirror": [], "upstream": [], "client": []}
    # Seconds from the GET until each cache holds the whole blob, and the
    # proxy registry's upstream GETs: it streams its client one GET and
    # stores the blob from a second one in the background.
    stored: dict[str, list[float]] = {"mirror": [], "proxy": []}
    proxy_gets: list[int] = []

    def through_mirror() -> float:
        nonlocal mirror
        if mirror is not None:
            bench.retire(mirror)
        bench.warm_upstream(blob)
        mirror = bench.new_mirror()
        pids = {"mirror": mirror.pid, "upstream": bench.upstream.registry.pid}
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start = time.monotonic()
        result = read(mirror.port, blob.api_path, blob.size)
        blob_file = cached_blob_file(mirror, blob)
        stored["mirror"].append(seconds_until_stored(blob_file, blob.size, start))
        for name, pid in pids.items():
            cpu[name].append((cpu_seconds(pid) - before[name]) / (blob.size / GIB))
        cpu["client"].append(result.cpu / (blob.size / GIB))
        mirror.sample_rss()
        return result.throughput

    def through_proxy() -> float:
        bench.warm_upstream(blob)
        proxy = bench.new_proxy()
        since = len(bench.upstream.registry.access_log())
        try:
            start = time.monotonic()
            rate = read(proxy.port, blob.api_path, blob.size).throughput
            blob_file = cached_blob_file(proxy, blob)
            elapsed = seconds_until_stored(blob_file, blob.size, start)
            stored["proxy"].append(elapsed)
            proxy_gets.append(upstream_blob_gets(bench, blob, since)[0])
            return rate
        finally:
            bench.retire_proxy(proxy)

    def into_new_file() -> float:
        bench.warm_upstream(blob)
        return download_to_file(bench, blob)

    upstream_rate, mirror_rate, proxy_rate, file_rate = interleave(
        bench.sizes.repeats, direct, through_mirror, through_proxy, into_new_file
    )
    passed = mirror_rate >= 0.8 * upstream_rate and mirror_rate > proxy_rate
    # Every byte costs the upstream, the mirror and the client CPU time on
    # the same cores: their sum per GiB bounds the rate this machine allows.
    per_gib = {name: median(values) for name, values in cpu.items()}
    stored_s = {name: median(values) for name, values in stored.items()}
    cores = os.cpu_count() or 1
    ceiling = cores / sum(per_gib.values()) * GIB if sum(per_gib.values()) else 0.0
    bench.rows.append(
        Row(
            f"1 client, {blob.size // MIB} MiB blob not cached",
            mib_s(mirror_rate),
            f"upstream {mib_s(upstream_rate)}; proxy registry {mib_s(proxy_rate)} "
            f"to its client, blob stored after {stored_s['proxy']:.1f} s (mirror "
            f"{stored_s['mirror']:.1f} s), {max(proxy_gets)} upstream GETs; "
            f"upstream into a new file {mib_s(file_rate)}; CPU s/GiB through the "
            f"mirror: mirror {per_gib['mirror']:.2f}, upstream "
            f"{per_gib['upstream']:.2f}, client {per_gib['client']:.2f}, so at most "
            f"{mib_s(ceiling)} on {cores} cores",
            ratio(mirror_rate, upstream_rate),
            ">= 0.8x upstream and > proxy registry",
            passed,
            {
                "mirror": mirror_rate,
                "upstream": upstream_rate,
                "proxy": proxy_rate,
                "proxy_ratio": ratio(mirror_rate, proxy_rate),
                "new_file": file_rate,
                "new_file_ratio": ratio(mirror_rate, file_rate),
                "cpu_seconds_per_gib": per_gib,
                "stored_after_seconds": stored_s,
                "proxy_upstream_gets": proxy_gets,
                "cpu_ceiling": ceiling,
            },  # fmt: skip
        )
    )
    assert mirror is not None
    return mirror


def seconds_until_stored(path: Path, size: int, start: float) -> float:
    """Seconds from ``start`` until ``path`` holds ``size`` bytes (polled)."""
    deadline = time.monotonic() + _STORE_WAIT
    while time.monotonic() < deadline:
        try:
            if path.stat().st_size == size:
                return time.monotonic() - start
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"{path} did not reach {size} bytes in {_STORE_WAIT} s")


def cold_single_tls(bench: Bench) -> None:
    """One client, big blob not cached, the upstream over HTTPS as TCR is.

    Not a target of its own: how much of the plain-HTTP figure survives
    TLS. The reference is curl reading the blob straight from the same
    HTTPS upstream (our reader speaks plain HTTP only).
    """
    blob = bench.upstream.blobs["big"]
    log(f"cold read of {blob.size // MIB} MiB over HTTPS")
    registry = tls_twin(bench.upstream, bench.workdir / "upstream-tls")
    registry.start()
    bench.stack.callback(registry.stop)
    assert registry.tls is not None
    ca_file = registry.tls.ca
    url = f"{registry.url}{blob.api_path}"

    def direct() -> float:
        bench.warm_upstream(blob)
        return curl_rate(url, ca_file, blob.size)

    def through_mirror() -> float:
        bench.warm_upstream(blob)
        mirror = bench.new_mirror(registry.url, ca_file=ca_file)
        try:
            rate = read(mirror.port, blob.api_path, blob.size).throughput
            mirror.sample_rss()
            return rate
        finally:
            bench.retire(mirror)

    direct_rate, mirror_rate = interleave(bench.sizes.repeats, direct, through_mirror)
    bench.rows.append(
        Row(
            f"1 client, {blob.size // MIB} MiB blob not cached, HTTPS upstream",
            mib_s(mirror_rate),
            f"curl straight from the HTTPS upstream {mib_s(direct_rate)}",
            ratio(mirror_rate, direct_rate),
            "none (how TLS weighs on the row above)",
            None,
            {"mirror": mirror_rate, "direct": direct_rate},
            informative=True,
        )
    )
    registry.stop()


def curl_rate(url: str, ca_file: Path, size: int) -> float:
    """Bytes per second of one GET with curl, as curl itself timed it.

    curl's own total runs from its connect to the last byte, like the
    mirror's fetch inside the mirror's figure; a timer around the command
    would also charge curl's start and its reading of the CA file.
    """
    command = ["curl", "-sSf", "--cacert", str(ca_file), "-o", "/dev/null"]
    command += ["-w", "%{size_download} %{time_total}", url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"curl {url}: {done.stderr.strip() or done.returncode}")
    received, seconds = done.stdout.split()
    if int(received) != size or float(seconds) <= 0:
        raise RuntimeError(f"curl {url}: got {received} of {size} bytes")
    return size / float(seconds)


def wrong_bytes(bench: Bench) -> None:
    """A blob whose bytes at the upstream no longer match its digest.

    One byte of the upstream's file is flipped, as a failing disk would.
    Each cache is asked twice on an empty store: the first GET fetches,
    the second shows what the cache kept.
    """
    log("a blob whose bytes do not match its digest")
    blob = bench.upstream.seed("wrong", 8 * MIB, seed=4)
    with blob.path.open("r+b") as data:
        data.seek(blob.size // 3)
        byte = data.read(1)
        data.seek(blob.size // 3)
        data.write(bytes([byte[0] ^ 0xFF]))
    outcomes: dict[str, list[str]] = {}
    mirror, proxy = bench.new_mirror(), bench.new_proxy()
    for name, port in (("mirror", mirror.port), ("proxy", proxy.port)):
        outcomes[name] = [_blob_outcome(port, blob) for _ in range(2)]
    bench.retire(mirror)
    bench.retire_proxy(proxy)
    drop_blob(blob)
    served_wrong = "served wrong bytes"
    bench.rows.append(
        Row(
            "GET of a blob whose upstream bytes do not match its digest, twice",
            ", then ".join(outcomes["mirror"]),
            "proxy registry " + ", then ".join(outcomes["proxy"]),
            None,
            "never serve or keep bytes that do not match the digest",
            served_wrong not in outcomes["mirror"],
            outcomes,
        )
    )


def _blob_outcome(port: int, blob: Blob) -> str:
    try:
        response = httpx.get(f"http://127.0.0.1:{port}{blob.api_path}", timeout=120)
    except httpx.HTTPError:
        return "cut short"
    if response.status_code != 200:
        return f"error {response.status_code}"
    if len(response.content) != blob.size:
        return "cut short"
    digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
    return "served right bytes" if digest == blob.digest else "served wrong bytes"


def download_to_file(bench: Bench, blob: Blob) -> float:
    """The blob straight from the upstream into a new file: bytes per second.

    Not a target, a floor: what any cache that keeps the blob pays on this
    machine just to write it into a new file, with no hashing and no second
    client. The same reader as every other row, writing what it reads.
    """
    target = bench.workdir / "direct-download"
    try:
        result = fetch_group(
            bench.upstream.port, blob.api_path, 1, blob.size, output=target
        )
    finally:
        size = target.stat().st_size if target.exists() else 0
        target.unlink(missing_ok=True)
    if not result.complete or size != blob.size:
        raise RuntimeError(f"the download into a file got {size} of {blob.size} bytes")
    return result.throughput


def warm_single(bench: Bench, mirror: Mirror) -> None:
    """One client, big blob cached: mirror vs nginx."""
    warm_read(bench, mirror, "big", 1)


def warm_read(bench: Bench, mirror: Mirror, name: str, clients: int) -> None:
    """``clients`` clients at once on a cached blob: aggregate rate vs nginx."""
    blob = bench.upstream.blobs[name]
    log(f"{clients} client(s), warm {blob.size // MIB} MiB")
    nginx_path = f"/{blob.hex}"
    read(bench.nginx.port, nginx_path, blob.size)
    read(mirror.port, blob.api_path, blob.size)
    nginx_rate, mirror_rate = interleave(
        bench.sizes.warm_repeats,
        lambda: read(bench.nginx.port, nginx_path, blob.size, clients).throughput,
        lambda: read(mirror.port, blob.api_path, blob.size, clients).throughput,
    )
    mirror.sample_rss()
    check = f"{clients} client{'s' if clients > 1 else ''}, {blob.size // MIB} MiB "
    check += "blob cached" + (" (aggregate)" if clients > 1 else "")
    bench.rows.append(
        Row(
            check,
            mib_s(mirror_rate),
            f"nginx {mib_s(nginx_rate)}",
            ratio(mirror_rate, nginx_rate),
            ">= 0.9x nginx",
            mirror_rate >= 0.9 * nginx_rate,
            {"mirror": mirror_rate, "nginx": nginx_rate},
        )
    )


def upstream_blob_gets(bench: Bench, blob: Blob, since: int) -> tuple[int, int]:
    """GETs of ``blob`` at the upstream after log entry ``since``, and their bytes."""
    entries = bench.upstream.registry.access_log()[since:]
    gets = [e for e in entries if e.method == "GET" and e.path == blob.api_path]
    return len(gets), sum(e.bytes for e in gets)


def cold_fanout(bench: Bench, clients: int = 32) -> tuple[Mirror, Registry]:
    """32 clients at once, mid blob not yet cached: upstream GETs and wall time.

    Each round starts an empty mirror and an empty proxy registry, in
    turns; the wall time is the median over the rounds, and the GETs and
    bytes are the most any round made (each must be exactly one GET).

    Returns the last mirror and proxy registry, which now hold the blob.
    """
    blob = bench.upstream.blobs["mid"]
    log(f"{clients} clients, cold {blob.size // MIB} MiB")
    walls: dict[str, list[float]] = {"mirror": [], "proxy": []}
    gets: dict[str, list[int]] = {"mirror": [], "proxy": []}
    sent: dict[str, list[int]] = {"mirror": [], "proxy": []}
    mirror: Mirror | None = None
    proxy: Registry | None = None
    for _ in range(bench.sizes.repeats):
        if mirror is not None and proxy is not None:
            bench.retire(mirror)
            bench.retire_proxy(proxy)
        mirror, proxy = bench.new_mirror(), bench.new_proxy()
        for name, server in (("mirror", mirror), ("proxy", proxy)):
            wall, count, size = fanout_round(bench, server, blob, clients)
            walls[name].append(wall)
            gets[name].append(count)
            sent[name].append(size)
        mirror.sample_rss()
    assert mirror is not None
    assert proxy is not None

    m_wall, p_wall = median(walls["mirror"]), median(walls["proxy"])
    m_gets, p_gets = max(gets["mirror"]), max(gets["proxy"])
    m_bytes, p_bytes = max(sent["mirror"]), max(sent["proxy"])
    passed = (
        set(gets["mirror"]) == {1}
        and set(sent["mirror"]) == {blob.size}
        and m_wall < p_wall
    )
    bench.rows.append(
        Row(
            f"{clients} clients, {blob.size // MIB} MiB blob not cached",
            f"{m_wall:.2f} s; upstream GETs {m_gets}, {m_bytes / blob.size:.2f}x bytes",
            f"proxy registry {p_wall:.2f} s; upstream GETs {p_gets}, "
            f"{p_bytes / blob.size:.2f}x bytes",
            ratio(m_wall, p_wall),
            "1 GET, 1x bytes; wall < proxy registry",
            passed,
            {
                "mirror_wall": m_wall,
                "mirror_gets": m_gets,
                "mirror_bytes": m_bytes,
                "proxy_wall": p_wall,
                "proxy_gets": p_gets,
                "proxy_bytes": p_bytes,
                "rounds": {"wall": walls, "gets": gets, "bytes": sent},
            },
        ),  # fmt: skip
    )
    return mirror, proxy


def fanout_round(
    bench: Bench, server: Mirror | Registry, blob: Blob, clients: int
) -> tuple[float, int, int]:
    """``clients`` clients at once on an empty cache: wall time, upstream GETs, bytes.

    The upstream's log is read only once the cache holds the whole blob:
    the proxy registry stores it from a GET of its own that can still run
    when its clients are done, and that GET would otherwise be missed here
    and counted in whichever window comes next.
    """
    bench.warm_upstream(blob)
    since = len(bench.upstream.registry.access_log())
    start = time.monotonic()
    wall = read(server.port, blob.api_path, blob.size, clients).wall
    seconds_until_stored(cached_blob_file(server, blob), blob.size, start)
    return (wall, *upstream_blob_gets(bench, blob, since))


def cached_blob_file(server: Mirror | Registry, blob: Blob) -> Path:
    """Where a mirror or a proxy registry keeps the blob once it holds it."""
    if isinstance(server, Mirror):
        return server.workdir / "data/blobs/sha256" / blob.hex[:2] / blob.hex
    return registry_blob_file(server.storage, blob.hex)


def warm_fanout(bench: Bench, mirror: Mirror, clients: int = 32) -> None:
    """32 clients at once, mid blob cached: aggregate rate, mirror vs nginx."""
    warm_read(bench, mirror, "mid", clients)


def request_rates(bench: Bench, mirror: Mirror, proxy: Registry) -> None:
    """HEAD of a blob and GET of a manifest by digest, 16 connections.

    HEAD goes through our own client (wrk hangs on HEAD), GET through wrk.
    """
    blob = bench.upstream.blobs["mid"]
    manifest = f"/v2/{REPOSITORY}/manifests/{bench.upstream.manifest_digest}"
    cases = [("HEAD of a blob", "HEAD", blob.api_path, run_rate_clients),
             ("GET of a manifest by digest", "GET", manifest, run_wrk)]  # fmt: skip
    for label, method, path, tool in cases:
        log(f"request rate: {label}")
        rates: dict[str, float] = {}
        errors: dict[str, int] = {}
        for name, port in (("mirror", mirror.port), ("proxy", proxy.port)):
            # A short run first, so both serve it from their own store.
            tool(port, path, method=method, accept=_MANIFEST_ACCEPT, seconds=1)
            result = tool(
                port, path, method=method, accept=_MANIFEST_ACCEPT,
                seconds=bench.sizes.rate_seconds,
            )  # fmt: skip
            rates[name], errors[name] = result.rate, result.errors
        mirror.sample_rss()
        bench.rows.append(
            Row(
                f"{label}, 16 connections",
                f"{rates['mirror']:,.0f} req/s{_errors(errors['mirror'])}",
                f"proxy registry {rates['proxy']:,.0f} req/s{_errors(errors['proxy'])}",
                ratio(rates["mirror"], rates["proxy"]),
                ">= proxy registry, no errors",
                rate_passed(rates, errors),
                {"rates": rates, "errors": errors},
            )
        )


def rate_passed(rates: dict[str, float], errors: dict[str, int]) -> bool:
    """Whether the mirror answered at least as fast as the proxy registry.

    A mirror that answered nothing fails, even against a proxy registry
    that did no better; so does one that left a request unanswered for
    more than a second (``_rate.py`` counts that as an error; wrk, for
    the GET, counts its own timeouts).
    """
    if rates["mirror"] <= 0 or errors["mirror"]:
        return False
    return rates["mirror"] >= rates["proxy"]


def _errors(count: float) -> str:
    return f", {count:.0f} errors" if count else ""


def tag_load(bench: Bench, mirror: Mirror, proxy: Registry) -> None:
    """GET of a manifest by tag, 16 connections: upstream requests per request."""
    path = f"/v2/{REPOSITORY}/manifests/{TAG}"
    seconds = bench.sizes.tag_seconds
    log(f"manifest by tag for {seconds} s")
    per_request = {}
    counts = {}
    for name, port in (("mirror", mirror.port), ("proxy", proxy.port)):
        since = len(bench.upstream.registry.access_log())
        result = run_wrk(port, path, accept=_MANIFEST_ACCEPT, seconds=seconds)
        upstream = len(bench.upstream.registry.access_log()[since:])
        per_request[name] = ratio(upstream, result.requests)
        counts[name] = {"client_requests": result.requests, "upstream": upstream,
                        "rate": result.rate, "errors": result.errors}  # fmt: skip
    mirror.sample_rss()
    m, p = counts["mirror"], counts["proxy"]
    bench.rows.append(
        Row(
            f"GET of a manifest by tag, 16 connections, {seconds} s",
            f"{per_request['mirror']:.4f} upstream/request "
            f"({m['upstream']} of {m['client_requests']}, {m['rate']:,.0f} req/s"
            f"{_errors(m['errors'])})",
            f"proxy registry {per_request['proxy']:.2f} "
            f"({p['upstream']} of {p['client_requests']}, {p['rate']:,.0f} req/s"
            f"{_errors(p['errors'])})",
            per_request["mirror"],
            "<= 0.1 upstream requests per request, no errors",
            tag_passed(m),
            {"mirror": m, "proxy": p},
        )
    )


def tag_passed(counts: dict[str, Any]) -> bool:
    """Whether the mirror's tag run met its target.

    A run that got no answer at all (a hung mirror: wrk counts a timeout
    only once its 5 s are up, which a 5 s run never sees) has no errors
    and 0 upstream requests per request, and must not pass.
    """
    requests = counts["client_requests"]
    if requests <= 0 or counts["errors"]:
        return False
    return bool(counts["upstream"] / requests <= 0.1)


def peak_rss(bench: Bench, reference: Mirror) -> None:
    """Peak RSS of every mirror so far; then the huge blob against the big one."""
    peak = max(mirror.sample_rss() for mirror in bench.mirrors)
    bench.rows.append(
        Row(
            "peak RSS of the mirror, all of the above",
            f"{peak / MIB:.1f} MiB",
            f"limit {_RSS_LIMIT // MIB} MiB",
            ratio(peak, _RSS_LIMIT),
            "< 128 MiB",
            peak < _RSS_LIMIT,
            {"peak": peak, "per_mirror": [m.peak_rss for m in bench.mirrors]},
        )
    )
    if bench.sizes.huge is not None:
        huge_rss(bench, bench.sizes.huge, reference.peak_rss)


def huge_rss(bench: Bench, size: int, reference: int) -> None:
    """A fresh mirror reads a huge blob cold then warm; its peak RSS must match."""
    label = f"peak RSS, {size // GIB} GiB blob (cold + warm read)"
    free = shutil.disk_usage(bench.workdir).free
    if free < _HUGE_FREE_NEEDED:
        message = f"skipped: {free / GIB:.1f} GiB free, need {_HUGE_FREE_NEEDED // GIB}"
        log(message)
        bench.rows.append(Row(label, message, "", None, "", None, {"free": free}))
        return

    log(f"seeding and reading a {size // GIB} GiB blob")
    blob = bench.upstream.seed("huge", size, seed=3)
    mirror = bench.new_mirror()
    try:
        cold = read(mirror.port, blob.api_path, blob.size).throughput
        warm = read(mirror.port, blob.api_path, blob.size).throughput
        rss = mirror.sample_rss()
    finally:
        bench.retire(mirror)
        blob.path.unlink(missing_ok=True)
    big = bench.upstream.blobs["big"].size
    same = abs(rss - reference) <= max(8 * MIB, reference // 10)
    bench.rows.append(
        Row(
            label,
            f"{rss / MIB:.1f} MiB (cold {mib_s(cold)}, warm {mib_s(warm)})",
            f"{big // GIB} GiB blob: {reference / MIB:.1f} MiB",
            ratio(rss, reference),
            "< 128 MiB and within 10% (or 8 MiB) of the 1 GiB case",
            rss < _RSS_LIMIT and same,
            {"rss": rss, "reference": reference, "cold": cold, "warm": warm},
        )
    )


def run(bench: Bench) -> None:
    bench.start()
    big_mirror = cold_single(bench)
    warm_single(bench, big_mirror)
    cold_single_tls(bench)
    big_mirror.stop()
    mirror, proxy = cold_fanout(bench)
    warm_fanout(bench, mirror)
    request_rates(bench, mirror, proxy)
    tag_load(bench, mirror, proxy)
    bench.retire(mirror)
    bench.retire_proxy(proxy)
    wrong_bytes(bench)
    peak_rss(bench, big_mirror)


# -- output -------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    lines = [
        "| check | tcr-mirror | reference | ratio | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        shown = "" if row.ratio is None else f"{row.ratio:.2f}"
        result = (
            "info"
            if row.informative
            else {True: "PASS", False: "FAIL", None: "SKIP"}[row.passed]
        )
        lines.append(
            f"| {row.check} | {row.mirror} | {row.reference} | {shown} "
            f"| {row.target} | {result} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="small blobs, short runs (< 2 min)"
    )
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument(
        "--workdir", type=Path, help="parent of the temporary directory (/tmp)"
    )
    parser.add_argument(
        "--congestion-control",
        metavar="NAME",
        help="run in a network namespace of its own whose TCP default is NAME "
        "(reno): nginx and the registries then use what the mirror uses",
    )
    return parser.parse_args(argv)


def load_average() -> str:
    # Other work on this 2-core machine skews figures; the load tells how much.
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys/net/ipv4", name).read_text().strip()
    except OSError:
        return "unknown"


def congestion_control() -> str:
    # nginx, the registries and the clients use the default of the network
    # namespace; the mirror uses reno on connections from this host. With a
    # pacing default (bbr), that alone puts the mirror's cached reads above
    # nginx's, hence --congestion-control to compare like with like.
    default = _sysctl("tcp_congestion_control")
    if os.environ.get(_NETNS_ENV):
        return (
            f"TCP congestion control: {default} (the benchmark's own network "
            "namespace; every server and client uses it)"
        )
    return (
        f"TCP congestion control: {default} (host default; the mirror uses "
        "reno for clients on this host)"
    )


def exec_in_own_netns(name: str) -> str:
    """Re-runs this benchmark in a new network namespace whose TCP default
    is ``name``; returns only if it cannot, with the reason."""
    if name not in _sysctl("tcp_available_congestion_control").split():
        return f"--congestion-control: {name!r} is not available on this host"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"--congestion-control needs {tool} (Debian: util-linux, iproute2)"
    # Only loopback exists in the new namespace, which is all the benchmark
    # uses. Root needs no user namespace; anyone else maps themselves to root
    # in one, which may set the default of a namespace it owns.
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    script = (
        'ip link set lo up && { echo "$1" > /proc/sys/net/ipv4/tcp_congestion_control'
        ' ; } 2>/dev/null || { echo "--congestion-control: cannot make $1 the default'
        ' of a new network namespace" >&2; exit 2; }; shift; exec "$@"'
    )
    command = ["unshare", "--net", *user, "--", "sh", "-c", script, "sh", name]
    command += [sys.executable, *sys.argv]
    try:
        os.execvpe("unshare", command, {**os.environ, _NETNS_ENV: name})
    except OSError as exc:
        return f"--congestion-control: cannot run unshare: {exc.strerror}"


def missing_tools() -> list[str]:
    tools = ["/usr/bin/docker-registry", "/usr/sbin/nginx", "wrk", "curl"]
    return [tool for tool in tools if shutil.which(tool) is None]


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.congestion_control and not os.environ.get(_NETNS_ENV):
        print(exec_in_own_netns(args.congestion_control), file=sys.stderr)
        return 2
    # Everything runs on 127.0.0.1: a proxy set for this machine would put
    # itself between curl, the mirror and the registries.
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        os.environ.pop(name, None)
        os.environ.pop(name.lower(), None)
    sizes = QUICK if args.quick else FULL
    started = datetime.datetime.now(datetime.UTC)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"date: {started.isoformat(timespec='seconds')}; {load_average()}")
    print(congestion_control())
    missing = missing_tools()
    if missing:
        print(f"missing tools: {', '.join(missing)} (apt-get install -y wrk nginx "
              "docker-registry)", file=sys.stderr)  # fmt: skip
        return 2
    if args.json is not None and not args.json.parent.is_dir():
        print(f"--json: {args.json.parent} is not a directory", file=sys.stderr)
        return 2
    try:
        workdir = Path(tempfile.mkdtemp(prefix="tcr-bench-", dir=args.workdir))
    except OSError as exc:
        print(f"--workdir: cannot make a directory in {args.workdir or '/tmp'}: "
              f"{exc.strerror}", file=sys.stderr)  # fmt: skip
        return 2
    signal.signal(signal.SIGTERM, _stop_on_sigterm)

    failed: BaseException | None = None
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        bench = Bench(workdir, sizes, stack)
        try:
            run(bench)
        except Exception as exc:
            failed = exc
            log(f"benchmark failed: {one_line(exc)}")

    elapsed = datetime.datetime.now(datetime.UTC) - started
    print(table(bench.rows))
    print(f"took {elapsed.total_seconds():.0f} s; {load_average()}")
    if args.json is not None:
        document = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "date": started.isoformat(timespec="seconds"),
            "mode": "quick" if args.quick else "full",
            "sizes": asdict(sizes),
            "seconds": elapsed.total_seconds(),
            "congestion_control": congestion_control(),
            "error": None if failed is None else one_line(failed),
            "rows": [asdict(row) for row in bench.rows],
        }
        try:
            args.json.write_text(json.dumps(document, indent=2) + "\n")
        except OSError as exc:
            log(f"cannot write {args.json}: {exc.strerror}")
            return 1
    return 1 if failed is not None else 0


def one_line(exc: BaseException) -> str:
    """The exception as one line (a failed node's message carries its log)."""
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
