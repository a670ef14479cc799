"""Load generators: groups of raw-socket readers, and wrk for request rates."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GroupResult", "RateResult", "fetch_group", "run_wrk"]

_CLIENT = Path(__file__).resolve().parent / "_client.py"
_GROUP_TIMEOUT = 900.0


@dataclass(frozen=True)
class GroupResult:
    """What a group of clients read: the wall time from first start to last end."""

    clients: int
    wall: float
    bytes: int
    statuses: list[int]
    complete: bool
    cpu: float = 0.0
    """CPU seconds the clients spent on their transfers, all together."""

    @property
    def throughput(self) -> float:
        """Aggregate bytes per second over the wall time."""
        return self.bytes / self.wall if self.wall > 0 else 0.0


def fetch_group(
    port: int,
    path: str,
    clients: int,
    expected: int,
    method: str = "GET",
    output: Path | None = None,
) -> GroupResult:
    """Starts ``clients`` readers of ``path``, releases them at once, waits.

    ``expected`` is each body's size; the result is complete only if every
    client got status 200 and all of it. With ``output`` (one client only)
    the body is also written into that new file.
    """
    command = [sys.executable, "-I", "-S", str(_CLIENT), "127.0.0.1", str(port)]
    processes: list[subprocess.Popen[str]] = []
    try:
        for _ in range(clients):
            processes.append(
                subprocess.Popen(
                    [*command, path, method, *([str(output)] if output else [])],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError(
                    f"a client could not connect to port {port}: {_last_error(process)}"
                )
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        results = [_result(process) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            # Closes its pipes and waits: a group cut short leaks nothing.
            with process:
                pass
    return _group(results, expected)


def _result(process: subprocess.Popen[str]) -> dict[str, float]:
    output, errors = process.communicate(timeout=_GROUP_TIMEOUT)
    try:
        result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    except (IndexError, ValueError):
        result = {}
    if "status" not in result:
        raise RuntimeError(f"a client failed: {_last_line(errors)}")
    return result


def _last_error(process: subprocess.Popen[str]) -> str:
    """The last line a client that gave up wrote to stderr (its exception)."""
    try:
        _, errors = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        return "no answer"
    return _last_line(errors)


def _last_line(text: str | None) -> str:
    # A client's traceback ends with its exception, which says what broke.
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else "no output"


def _group(results: list[dict[str, float]], expected: int) -> GroupResult:
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    statuses = [int(r["status"]) for r in results]
    total = sum(int(r["bytes"]) for r in results)
    complete = all(s == 200 for s in statuses) and all(
        int(r["bytes"]) == expected for r in results
    )
    cpu = sum(float(r.get("cpu", 0.0)) for r in results)
    return GroupResult(len(results), wall, total, statuses, complete, cpu)


@dataclass(frozen=True)
class RateResult:
    requests: int
    seconds: float
    errors: int

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


_WRK_SCRIPT = """\
wrk.method = "{method}"
wrk.headers["Accept"] = "{accept}"
wrk.headers["User-Agent"] = "tcr-mirror-bench-wrk/1"
"""


def run_wrk(
    port: int,
    path: str,
    *,
    method: str = "GET",
    accept: str = "*/*",
    connections: int = 16,
    seconds: int = 5,
) -> RateResult:
    """Runs wrk (2 threads) against ``path``; non-2xx answers count as errors."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT.format(method=method, accept=accept))
        script.flush()
        command = [
            "wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
            "-s", script.name, f"http://127.0.0.1:{port}{path}",
        ]  # fmt: skip
        output = subprocess.run(
            command, capture_output=True, text=True, timeout=seconds + 60, check=True
        ).stdout
    return _parse_wrk(output)


def _parse_wrk(output: str) -> RateResult:
    done = re.search(r"(\d+) requests in ([\d.]+)(m?s|m)\b", output)
    if done is None:
        raise RuntimeError(f"cannot read wrk output: {output!r}")
    unit = {"s": 1.0, "ms": 0.001, "m": 60.0}[done[3]]
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: (.*)"):
        found = re.search(pattern, output)
        if found is not None:
            errors += sum(int(n) for n in re.findall(r"\d+", found[1]))
    return RateResult(int(done[1]), float(done[2]) * unit, errors)


_RATE = Path(__file__).resolve().parent / "_rate.py"


def run_rate_clients(
    port: int,
    path: str,
    *,
    method: str = "HEAD",
    accept: str = "*/*",
    connections: int = 16,
    processes: int = 2,
    seconds: int = 5,
) -> RateResult:
    """Like :func:`run_wrk` with our own client (``_rate.py``), which can HEAD."""
    per_process = str(connections // processes)
    command = [sys.executable, "-I", "-S", str(_RATE), "127.0.0.1", str(port),
               path, method, accept, str(seconds), per_process]  # fmt: skip
    running = [
        subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    try:
        outputs = [p.communicate(timeout=seconds + 60) for p in running]
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
            with process:
                pass
    results = []
    for output, errors in outputs:
        try:
            results.append(json.loads(output))
        except ValueError:
            raise RuntimeError(
                f"a rate client on port {port} failed: {_last_line(errors)}"
            ) from None
    return RateResult(
        sum(r["requests"] for r in results),
        max(r["seconds"] for r in results),
        sum(r["errors"] for r in results),
    )
