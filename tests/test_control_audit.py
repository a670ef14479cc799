"""The audit log: CloudAudit-shaped events, hash chain, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from support.filesystems import fill, mounted_tmpfs
from tcr_mirror.control import CallRecord, TcrError, TcrResponse
from tcr_mirror.control._audit import (
    GENESIS_HASH,
    REDACTED,
    AuditLog,
    audit_hook,
    event_from_call,
    query,
    redact,
    verify,
)

SECRET_TOKEN = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.sig-XYZZY"
SECRET_PASSWORD = "hunter2-PLUGH"
SECRET_KEY = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"


def make_call(
    action: str,
    params: Mapping[str, Any] | None = None,
    response: TcrResponse | None = None,
    error: TcrError | None = None,
    started_at: float = 1735877397.25,
) -> CallRecord:
    return CallRecord(
        action=action,
        params=dict(params or {}),
        response=response,
        error=error,
        started_at=started_at,
        duration=0.012,
        endpoint="http://127.0.0.1:9000",
        region="ap-guangzhou",
        user_agent="tcr-mirror/0.1",
    )


def token_call(started_at: float = 1735877397.25) -> CallRecord:
    data = {
        "Username": "100036950234",
        "Token": SECRET_TOKEN,
        "ExpTime": 1735880997750,
        "TokenId": "",
    }
    return make_call(
        "CreateInstanceToken",
        {"RegistryId": "tcr-dg284imq", "TokenType": "temp"},
        TcrResponse("CreateInstanceToken", "req-1", data),
        started_at=started_at,
    )


def failed_call(started_at: float = 1735877400.0) -> CallRecord:
    return make_call(
        "DeleteInstanceToken",
        {"RegistryId": "tcr-dg284imq", "TokenId": "nope"},
        error=TcrError("ResourceNotFound", "no such token", request_id="req-2"),
        started_at=started_at,
    )


def write_log(path: Path, count: int) -> None:
    with AuditLog(path) as log:
        hook = audit_hook(log, secret_id="AKIDexample", source_ip="127.0.0.1")
        for index in range(count):
            hook(token_call(1735877397.0 + index))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- events --------------------------------------------------------------


def test_event_follows_cloudaudit_record() -> None:
    event = event_from_call(token_call(), secret_id="AKIDexample", source_ip="10.0.0.1")

    assert event["eventName"] == "CreateInstanceToken"
    assert event["resourceType"] == "tcr"
    assert event["eventTime"] == 1735877397
    assert event["requestID"] == "req-1"
    assert event["actionType"] == "Write"
    assert event["userIdentity"] == {"type": "SecretId", "secretId": "AKIDexample"}
    assert event["sourceIPAddress"] == "10.0.0.1"
    assert event["eventSource"] == "127.0.0.1:9000"
    assert event["resourceName"] == "tcr-dg284imq"
    assert json.loads(event["requestParameters"]) == {
        "RegistryId": "tcr-dg284imq",
        "TokenType": "temp",
    }
    elements = json.loads(event["responseElements"])
    assert elements["Token"] == REDACTED
    assert elements["Username"] == "100036950234"
    assert elements["RequestId"] == "req-1"
    assert event["errorCode"] == 0


def test_failed_call_is_an_event_with_its_code() -> None:
    event = event_from_call(failed_call(), secret_id="AKIDexample")

    assert event["errorCode"] == "ResourceNotFound"
    assert event["apiErrorCode"] == "ResourceNotFound"
    assert event["errorMessage"] == "no such token"
    assert event["requestID"] == "req-2"
    assert event["responseElements"] == ""


def test_auth_failure_is_not_an_api_error() -> None:
    call = make_call(
        "DescribeInstances",
        error=TcrError("AuthFailure.SignatureFailure", "bad signature", request_id="r"),
    )
    event = event_from_call(call, secret_id=None)

    assert event["errorCode"] == "AuthFailure.SignatureFailure"
    assert event["apiErrorCode"] == ""
    assert event["actionType"] == "Read"


def test_redact_walks_nested_values() -> None:
    value = {
        "Rule": {"Name": "r"},
        "PeerReplicationOption": {"PeerRegistryToken": SECRET_TOKEN, "Uin": "1"},
        "Users": [{"Password": SECRET_PASSWORD, "Name": "a"}],
        "SecretKey": SECRET_KEY,
        "TokenId": "keep-me",
        "TokenType": "temp",
    }

    redacted = redact(value)

    assert redacted["PeerReplicationOption"]["PeerRegistryToken"] == REDACTED
    assert redacted["Users"][0] == {"Password": REDACTED, "Name": "a"}
    assert redacted["SecretKey"] == REDACTED
    assert redacted["TokenId"] == "keep-me"
    assert redacted["TokenType"] == "temp"
    assert value["SecretKey"] == SECRET_KEY


def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        hook = audit_hook(log, secret_id="AKIDexample")
        hook(token_call())
        hook(
            make_call(
                "ManageReplication",
                {"PeerReplicationOption": {"PeerRegistryToken": SECRET_TOKEN}},
            )
        )
        hook(make_call("CreateUserPersonal", {"Password": SECRET_PASSWORD}))

    text = path.read_text()
    assert len(text.splitlines()) == 3
    for secret in (SECRET_TOKEN, SECRET_PASSWORD, SECRET_KEY):
        assert secret not in text
    assert "AKIDexample" in text


# --- chain ---------------------------------------------------------------


def test_chain_links_each_line_to_the_previous(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)

    records = [json.loads(line) for line in lines_of(path)]

    assert [r["seq"] for r in records] == [0, 1, 2]
    assert records[0]["prevHash"] == GENESIS_HASH
    result = verify(path)
    assert result.ok, str(result)
    assert result.lines == 3


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 2)
    write_log(path, 2)

    assert verify(path).ok
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [0, 1, 2, 3]


def test_edited_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = lines_of(path)
    lines[2] = lines[2].replace(b"tcr-dg284imq", b"tcr-00000000")
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert not result.ok
    assert (result.bad_line, result.reason) == (3, "edited")


def test_edited_and_rehashed_line_is_found_by_its_successor(tmp_path: Path) -> None:
    from tcr_mirror.control._audit import _seal

    path = tmp_path / "audit.jsonl"
    write_log(path, 4)
    lines = lines_of(path)
    record = json.loads(lines[1])
    record["eventName"] = "DescribeInstances"
    lines[1] = _seal(record)
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert (result.ok, result.bad_line, result.reason) == (False, 2, "edited")


def test_edited_last_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = lines_of(path)
    lines[-1] = lines[-1].replace(b'"errorCode":0', b'"errorCode":1')
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert (result.bad_line, result.reason) == (3, "edited")


def test_deleted_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = lines_of(path)
    del lines[3]
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert (result.ok, result.bad_line, result.reason) == (False, 4, "deleted")


def test_deleted_first_line_is_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    path.write_bytes(b"".join(lines_of(path)[1:]))

    result = verify(path)

    assert (result.bad_line, result.reason) == (1, "deleted")


def test_reordered_lines_are_found(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 5)
    lines = lines_of(path)
    lines[1], lines[2] = lines[2], lines[1]
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert (result.ok, result.bad_line, result.reason) == (False, 2, "reordered")


def test_garbage_line_in_the_middle_is_torn(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    lines = lines_of(path)
    lines.insert(1, lines[1][:40] + b"\n")
    path.write_bytes(b"".join(lines))

    result = verify(path)

    assert (result.bad_line, result.reason) == (2, "torn")


def test_torn_tail_is_ignored_then_cut_on_open(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_log(path, 3)
    whole = path.read_bytes()
    path.write_bytes(whole + lines_of(path)[0][:57])

    result = verify(path)
    assert result.ok
    assert result.torn_tail
    assert result.lines == 3

    write_log(path, 1)
    assert path.read_bytes().startswith(whole)
    result = verify(path)
    assert (result.ok, result.lines, result.torn_tail) == (True, 4, False)


def test_closed_log_refuses_appends(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    log.close()

    with pytest.raises(ValueError, match="closed"):
        log.append({"eventName": "X"})


def test_threads_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    # TcrClient runs its hook in worker threads, so calls made at the same
    # moment append from several threads to one open log.
    path = tmp_path / "audit.jsonl"
    threads, each = 8, 40
    with AuditLog(path) as log:
        start = threading.Barrier(threads)

        def append_many(worker: int) -> None:
            start.wait()
            for index in range(each):
                log.append({"eventName": "DescribeInstances", "w": worker, "i": index})

        pool = [threading.Thread(target=append_many, args=(n,)) for n in range(threads)]
        for thread in pool:
            thread.start()
        for thread in pool:
            thread.join(timeout=60)

    result = verify(path)
    assert result.ok, str(result)
    assert [json.loads(line)["seq"] for line in lines_of(path)] == list(
        range(threads * each)
    )


# --- crash ---------------------------------------------------------------

_APPENDER = """
import sys
from tcr_mirror.control._audit import AuditLog
log = AuditLog(sys.argv[1])
# Big lines so that the kill has a fair chance to land inside a write.
payload = "x" * 200_000
for index in range(100_000):
    log.append({"eventName": "CreateInstanceToken", "pad": payload, "i": index})
"""


def test_sigkill_during_appends_leaves_a_log_that_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _APPENDER, str(path)])
    try:
        for _ in range(500):
            if path.exists() and path.stat().st_size > 2_000_000:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    assert proc.returncode == -signal.SIGKILL
    result = verify(path)
    assert result.ok, str(result)
    assert result.lines >= 5

    with AuditLog(path) as log:
        log.append({"eventName": "DescribeInstances"})
    after = verify(path)
    assert (after.ok, after.lines, after.torn_tail) == (True, result.lines + 1, False)


_DIES_MID_LINE = """
import os, signal, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(fd, b'{"eventName":"CreateInstanceToken","seq":')
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_writer_killed_mid_line_does_not_break_a_log_held_open(
    tmp_path: Path,
) -> None:
    # `control serve` keeps the log open for days while CLI runs share the
    # file; one of them dying mid-line must not spoil serve's next event.
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        log.append({"eventName": "DescribeInstances"})
        crashed = subprocess.run(
            [sys.executable, "-c", _DIES_MID_LINE, str(path)], timeout=30, check=False
        )
        assert crashed.returncode == -signal.SIGKILL
        log.append({"eventName": "CreateInstanceToken"})

    result = verify(path)
    assert (result.ok, result.lines, result.torn_tail) == (True, 2, False), str(result)


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown."""
    with mounted_tmpfs(tmp_path / "fs", "size=1m") as mountpoint:
        yield mountpoint


def test_full_disk_fails_the_append_and_leaves_no_half_event(
    small_filesystem: Path,
) -> None:
    path = small_filesystem / "audit.jsonl"
    filler = small_filesystem / "filler"
    with AuditLog(path) as log:
        log.append({"eventName": "DescribeInstances"})
        fill(filler)
        # Two free pages: the big event starts to go out, then the disk is full.
        os.truncate(filler, filler.stat().st_size - 8192)

        with pytest.raises(OSError):
            log.append({"eventName": "CreateInstanceToken", "pad": "x" * 262144})

    result = verify(path)
    assert (result.ok, result.lines, result.torn_tail) == (True, 1, False), str(result)


# --- query ---------------------------------------------------------------


def test_query_by_event_time_and_error(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog(path) as log:
        hook = audit_hook(log)
        hook(token_call(1000.0))
        hook(failed_call(2000.0))
        hook(token_call(3000.0))

    def names(events: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return [(e["eventName"], e["eventTime"]) for e in events]

    assert names(query(path, events=["CreateInstanceToken"])) == [
        ("CreateInstanceToken", 1000),
        ("CreateInstanceToken", 3000),
    ]
    assert names(query(path, since=1500, until=3000)) == [
        ("DeleteInstanceToken", 2000),
        ("CreateInstanceToken", 3000),
    ]
    assert names(query(path, errors_only=True)) == [("DeleteInstanceToken", 2000)]
    assert query(path, events=["ManageReplication"]) == []
