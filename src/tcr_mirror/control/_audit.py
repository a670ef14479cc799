"""The control plane's audit log: one CloudAudit-shaped event per TCR call.

Why a hash chain: the log is evidence of what the control plane did to TCR,
so an edit, a deleted line or a reordering must show. Every line is a JSON
object carrying ``seq`` (0, 1, 2, ...), ``prevHash`` (sha256 of the previous
line's bytes; :data:`GENESIS_HASH` for the first) and, last, ``hash`` (sha256
of the line's own bytes up to that field), so an edit shows at the line
itself and a re-hashed edit shows at the next line.

Why one ``write`` per line with ``O_APPEND`` and ``fsync``: a crash may then
lose at most the line being written, and only as a torn tail without its
newline, which opening the log cuts away. Writers take an exclusive
``flock`` so a CLI run and ``control serve`` can share one file.

The record follows TCR-API.md §4.2/§4.3 (camelCase names, ``eventID``,
``requestID``, ``requestParameters``/``responseElements`` as JSON strings).
Secrets are removed from both by key name before anything is written.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ._client import CallRecord
from ._errors import TcrError

__all__ = [
    "GENESIS_HASH",
    "REDACTED",
    "AuditLog",
    "VerifyResult",
    "audit_hook",
    "event_from_call",
    "query",
    "read_events",
    "redact",
    "verify",
]

GENESIS_HASH = hashlib.sha256(b"tcr-mirror audit log v1").hexdigest()
REDACTED = "******"

# Compared lower-cased. Names ending in these suffixes are secrets too
# (PeerRegistryToken, SessionToken, ...); TokenId and TokenType are not.
_SECRET_NAMES = frozenset(
    {"token", "password", "secretkey", "secret_key", "authorization", "secret"}
)
_SECRET_SUFFIXES = ("token", "password", "secretkey", "secret_key")
_READ_PREFIXES = ("Describe", "Validate", "Get", "List")
_AUTH_PREFIXES = ("AuthFailure", "UnauthorizedOperation")
_HASH_TAIL = re.compile(rb',"hash":"([0-9a-f]{64})"\}$')
_CHUNK = 8192


def redact(value: Any) -> Any:
    """Return a copy of ``value`` with every secret-named field replaced.

    Walks dicts and lists recursively; a key is secret when its lower-cased
    name is a known secret (``Token``, ``Password``, ``SecretKey``, ...) or
    ends in ``token``/``password``/``secretkey``.

    Returns:
        The redacted copy; the input is not modified.
    """
    if isinstance(value, Mapping):
        return {
            key: REDACTED if _is_secret_name(str(key)) else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(item) for item in value]
    return value


def _is_secret_name(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return lowered in _SECRET_NAMES or lowered.endswith(_SECRET_SUFFIXES)


# --- building events -----------------------------------------------------


def event_from_call(
    call: CallRecord, *, secret_id: str | None, source_ip: str = ""
) -> dict[str, Any]:
    """Build the CloudAudit-shaped record of one TCR call (not yet chained).

    Args:
        call: the client's record of the call, successful or failed.
        secret_id: the caller's SecretId (an identifier, not the key).
        source_ip: the address the call left from, if known.

    Returns:
        The event as a dict; secrets in parameters and response removed.
    """
    params = redact(dict(call.params))
    region = call.region
    resource = _resource_name(params)
    event: dict[str, Any] = {
        "eventVersion": 2,
        "eventType": "ApiCall",
        "eventName": call.action,
        "eventSource": urlsplit(call.endpoint).netloc or call.endpoint,
        "eventRegion": region,
        "eventTime": int(call.started_at),
        "eventID": str(uuid.uuid4()),
        "requestID": _request_id(call),
        "apiVersion": "3.0",
        "actionType": "Read" if call.action.startswith(_READ_PREFIXES) else "Write",
        "httpMethod": "POST",
        "userAgent": call.user_agent,
        "sourceIPAddress": source_ip,
        "userIdentity": {"type": "SecretId", "secretId": secret_id or ""},
        "resourceType": "tcr",
        "resourceName": resource,
        "resources": json.dumps([f"qcs::tcr:{region}::instance/{resource}"])
        if resource
        else "[]",
        "requestParameters": _compact(params),
        "responseElements": _response_elements(call),
        "durationMs": round(call.duration * 1000, 3),
        "attempts": call.attempts,
    }
    event.update(_error_fields(call.error))
    return event


def _request_id(call: CallRecord) -> str:
    if call.response is not None:
        return call.response.request_id
    if call.error is not None and call.error.request_id:
        return call.error.request_id
    return ""


def _resource_name(params: Mapping[str, Any]) -> str:
    for key in ("RegistryId", "SourceRegistryId", "RepoName", "Namespace"):
        value = params.get(key)
        if isinstance(value, str):
            return value
    return ""


def _response_elements(call: CallRecord) -> str:
    if call.response is None:
        return ""
    elements = dict(redact(call.response.data))
    elements["RequestId"] = call.response.request_id
    return _compact(elements)


def _error_fields(error: TcrError | None) -> dict[str, Any]:
    # CloudAudit splits auth (CAM) failures into errorCode and business
    # failures into apiErrorCode; errorCode carries either, so one field
    # answers "did it fail, and how".
    if error is None:
        return {
            "errorCode": 0,
            "errorMessage": "",
            "apiErrorCode": "",
            "apiErrorMessage": "",
        }
    is_auth = error.code.startswith(_AUTH_PREFIXES)
    return {
        "errorCode": error.code,
        "errorMessage": error.message,
        "apiErrorCode": "" if is_auth else error.code,
        "apiErrorMessage": "" if is_auth else error.message,
    }


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


# --- writing -------------------------------------------------------------


class AuditLog:
    """An append-only, hash-chained JSON-lines audit log.

    Opening the log cuts away a torn final line (one without its newline,
    left by a crash), so the chain it continues is intact.

    Raises:
        OSError: the file cannot be opened, locked or written.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(self.path, flags, 0o600)
        # flock excludes other processes only: threads of this one share the
        # open file, so they also take this lock.
        self._thread_lock = threading.Lock()
        with self._locked():
            self._cut_torn_tail()

    def __repr__(self) -> str:
        return f"AuditLog({self.path!r})"

    def append(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Chain ``event`` to the log and write it durably as one line.

        Returns:
            The event as written, with ``seq``, ``prevHash`` and ``hash``.

        Raises:
            ValueError: the log is closed.
            OSError: writing or syncing failed.
        """
        fd = self._require_fd()
        with self._thread_lock, self._locked():
            # Another writer of this file may have died mid-line since we
            # opened it; chaining onto its fragment would glue the two.
            self._cut_torn_tail()
            last = self._last_line()
            seq, prev_hash = _next_link(last)
            record = {**event, "seq": seq, "prevHash": prev_hash}
            record.pop("hash", None)
            line = _seal(record)
            self._write_whole(fd, line)
        return json.loads(line)  # type: ignore[no-any-return]

    def _write_whole(self, fd: int, line: bytes) -> None:
        # A full disk makes write() return short instead of failing; an
        # event half on disk must fail the append, not pass for written.
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                count = os.write(fd, line[written:])
                if count == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += count
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, start)
            raise

    def close(self) -> None:
        """Close the file; later appends raise ValueError."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _require_fd(self) -> int:
        if self._fd is None:
            raise ValueError("audit log is closed")
        return self._fd

    def _locked(self) -> _Flock:
        return _Flock(self._require_fd())

    def _cut_torn_tail(self) -> None:
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        start = self._line_start(size)
        os.ftruncate(fd, start)
        os.fsync(fd)

    def _last_line(self) -> bytes | None:
        fd = self._require_fd()
        size = os.fstat(fd).st_size
        if size == 0:
            return None
        start = self._line_start(size - 1)
        return os.pread(fd, size - 1 - start, start)

    def _line_start(self, end: int) -> int:
        """Offset just after the last newline before ``end`` (0 if none)."""
        fd = self._require_fd()
        pos = end
        while pos > 0:
            step = min(_CHUNK, pos)
            chunk = os.pread(fd, step, pos - step)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                return pos - step + newline + 1
            pos -= step
        return 0


class _Flock:
    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _next_link(last: bytes | None) -> tuple[int, str]:
    if last is None:
        return 0, GENESIS_HASH
    try:
        seq = int(json.loads(last)["seq"]) + 1
    except (ValueError, KeyError, TypeError):
        # A damaged last line still gets chained to; verify() reports it.
        seq = -1
    return seq, hashlib.sha256(last).hexdigest()


def _seal(record: Mapping[str, Any]) -> bytes:
    body = _compact(record).encode()
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + f',"hash":"{digest}"}}\n'.encode()


def audit_hook(
    log: AuditLog, *, secret_id: str | None = None, source_ip: str = ""
) -> Callable[[CallRecord], None]:
    """Return an ``on_call`` hook for ``TcrClient`` that audits every call.

    Args:
        log: where events go.
        secret_id: the caller's SecretId, recorded as ``userIdentity``.
        source_ip: the caller's address, recorded as ``sourceIPAddress``.

    Returns:
        A callable taking the client's ``CallRecord``. It writes
        synchronously (one small write and an fsync per call): on trio, call
        it in a worker thread. Appends from several threads or processes are
        serialized by the log's lock.
    """

    def on_call(call: CallRecord) -> None:
        log.append(event_from_call(call, secret_id=secret_id, source_ip=source_ip))

    return on_call


# --- reading -------------------------------------------------------------


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of :func:`verify`.

    ``bad_line`` is 1-based; ``reason`` is one of ``edited``, ``deleted``,
    ``reordered``, ``torn``. ``torn_tail`` says a final line without its
    newline was ignored (what a crash mid-write leaves).
    """

    ok: bool
    lines: int
    bad_line: int | None = None
    reason: str | None = None
    detail: str = ""
    torn_tail: bool = False
    last_hash: str = GENESIS_HASH

    def __str__(self) -> str:
        if self.ok:
            tail = " (torn final line ignored)" if self.torn_tail else ""
            return f"ok: {self.lines} events, chain intact{tail}"
        return f"line {self.bad_line}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class _Line:
    number: int
    raw: bytes
    record: dict[str, Any] | None
    sealed: bool


def verify(path: str | os.PathLike[str]) -> VerifyResult:
    """Check the hash chain of the audit log at ``path``.

    Returns:
        ``ok`` with the number of events, or the first bad line (1-based)
        and why: ``edited`` (its bytes or a predecessor's changed),
        ``deleted`` (a gap in ``seq``), ``reordered`` (an event out of
        place) or ``torn`` (a line that is not a whole event).

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        data = file.read()
    torn_tail = bool(data) and not data.endswith(b"\n")
    raws = data.split(b"\n")[:-1]
    lines = [_parse(number, raw) for number, raw in enumerate(raws, start=1)]
    seqs = {line.record.get("seq") for line in lines if line.record is not None}

    prev_hash = GENESIS_HASH
    for index, line in enumerate(lines):
        bad = _check_line(line, index, prev_hash, seqs)
        if bad is not None:
            return bad
        prev_hash = hashlib.sha256(line.raw).hexdigest()
    return VerifyResult(True, len(lines), torn_tail=torn_tail, last_hash=prev_hash)


def _parse(number: int, raw: bytes) -> _Line:
    try:
        record = json.loads(raw)
    except ValueError:
        return _Line(number, raw, None, False)
    if not isinstance(record, dict):
        return _Line(number, raw, None, False)
    match = _HASH_TAIL.search(raw)
    if match is None:
        return _Line(number, raw, record, False)
    content = hashlib.sha256(raw[: match.start()] + b"}").hexdigest()
    return _Line(number, raw, record, content == match.group(1).decode())


def _check_line(
    line: _Line, index: int, prev_hash: str, seqs: set[Any]
) -> VerifyResult | None:
    def bad(number: int, reason: str, detail: str) -> VerifyResult:
        return VerifyResult(False, index, number, reason, detail)

    if line.record is None:
        return bad(line.number, "torn", "not a complete JSON event")
    if not line.sealed:
        return bad(line.number, "edited", "its hash does not match its content")
    seq = line.record.get("seq")
    if seq != index:
        if index in seqs and isinstance(seq, int):
            return bad(line.number, "reordered", f"seq {seq} found where {index} is")
        return bad(line.number, "deleted", f"seq {index} is missing (found {seq})")
    if line.record.get("prevHash") != prev_hash:
        # The line itself is intact, so its predecessor was replaced by a
        # line that was re-hashed after editing.
        return bad(
            line.number - 1, "edited", f"line {line.number} carries another hash of it"
        )
    return None


def read_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Yield every whole event of the log in order, skipping a torn tail.

    Raises:
        OSError: the file cannot be read.
    """
    with open(path, "rb") as file:
        for raw in file:
            if not raw.endswith(b"\n"):
                return
            try:
                record = json.loads(raw)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record


def event_time(event: Mapping[str, Any]) -> float | None:
    """The ``eventTime`` of ``event`` in unix seconds; None if unreadable."""
    value = event.get("eventTime")
    if isinstance(value, bool):
        return None
    try:
        when = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return when if math.isfinite(when) else None


def query(
    path: str | os.PathLike[str],
    *,
    events: Iterable[str] | None = None,
    since: float | None = None,
    until: float | None = None,
    errors_only: bool = False,
) -> list[dict[str, Any]]:
    """Select events by name, time range (unix seconds, inclusive) and error.

    Returns:
        The matching events in log order.

    Raises:
        OSError: the file cannot be read.
        ValueError: a time range was given and an event's ``eventTime`` is
            not unix seconds, so it cannot be placed in the range.
    """
    names = set(events) if events is not None else None
    selected = []
    for event in read_events(path):
        if names is not None and event.get("eventName") not in names:
            continue
        if not _in_range(event, since, until):
            continue
        if errors_only and event.get("errorCode") in (0, "0", "", None):
            continue
        selected.append(event)
    return selected


def _in_range(
    event: Mapping[str, Any], since: float | None, until: float | None
) -> bool:
    if since is None and until is None:
        return True
    when = event_time(event)
    if when is None:
        raise ValueError(
            f"event seq {event.get('seq')!r} has an eventTime that is not "
            f"unix seconds: {event.get('eventTime')!r}"
        )
    return (since is None or when >= since) and (until is None or when <= until)
