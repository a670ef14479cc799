"""The soak's checker and argument parsing (loadtest/soak_node.py), sans IO.

The soak itself is not run here: it takes minutes and starts real servers.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

_LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"
sys.path.insert(0, str(_LOADTEST))

import soak_node  # noqa: E402
from support.faultproxy import FaultKind  # noqa: E402

_ERROR = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "x"}]}).encode()


@pytest.mark.parametrize(
    ("method", "status", "body"),
    [
        ("GET", 200, b""),
        ("GET", 206, b""),
        ("GET", 429, b""),
        ("GET", 503, _ERROR),
        ("GET", 507, _ERROR),
        ("HEAD", 502, b""),
    ],
)
def test_answers_a_client_may_get(method: str, status: int, body: bytes) -> None:
    assert soak_node.status_violation(method, status, body) is None


@pytest.mark.parametrize(
    ("method", "status", "body"),
    [
        ("GET", 500, _ERROR),
        ("HEAD", 500, b""),
        ("GET", 404, _ERROR),
        ("GET", 503, b"upstream down"),
        ("GET", 502, b'{"errors": []}'),
        ("GET", 504, b"[1]"),
        # A full store is StoreFull's error, nothing else.
        ("GET", 507, b'{"errors": [{"code": "DENIED", "message": "x"}]}'),
        ("GET", 507, b'{"errors": ["full"]}'),
    ],
)
def test_answers_that_break_the_rules(method: str, status: int, body: bytes) -> None:
    assert soak_node.status_violation(method, status, body) is not None


def test_only_a_complete_wrong_body_is_a_violation() -> None:
    checker = soak_node.Checker()

    checker.body("GET a", complete=False, wrong_at=10)
    checker.body("GET b", complete=True, wrong_at=None)
    assert checker.summary() == []

    checker.body("GET c", complete=True, wrong_at=3)
    checker.body("GET d", complete=True, wrong_at=0)
    assert checker.summary() == [
        "bytes: 2 violation(s), first: GET c: complete body, byte 3 wrong"
    ]


def test_one_summary_line_per_invariant() -> None:
    checker = soak_node.Checker()

    checker.answer("GET x", "GET", 500, _ERROR)
    checker.violation("store", "blobs/sha256/ab/ab.. has other bytes")
    checker.answer("GET y", "GET", 200, b"")

    lines = checker.summary()
    assert [line.split(":")[0] for line in lines] == ["status", "store"]
    assert checker.counts == {"GET 500": 1, "GET 200": 1}


def test_the_comparer_finds_the_first_wrong_byte(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(100)))
    comparer = soak_node.Comparer(path, 10)

    comparer.feed(bytes(range(10, 20)))
    comparer.feed(bytes([20, 21, 99, 23]))
    comparer.feed(b"\xff")
    comparer.close()

    assert (comparer.received, comparer.wrong_at) == (15, 12)


def test_a_body_longer_than_the_file_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    comparer = soak_node.Comparer(path, 1)

    comparer.feed(b"bcd")
    comparer.close()

    assert comparer.wrong_at == 2


def test_the_index_and_the_files_must_agree() -> None:
    files = {"sha256:aa": 10, "sha256:bb": 20}
    assert soak_node.index_violations(dict(files), files) == []

    entries = {"sha256:aa": 10, "sha256:bb": 21, "sha256:cc": 5}
    assert soak_node.index_violations(entries, files | {"sha256:dd": 1}) == [
        "sha256:bb: indexed with 21 B, file has 20",
        "sha256:cc: indexed with 5 B, file has none",
        "sha256:dd: file not indexed",
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--seconds", "0"],
        ["--clients", "x"],
        ["--max-store-bytes", "-1"],
        ["--tmpfs-mib", "0"],
        ["--tmpfs-mib", "64"],  # no room for the 64 MiB blob and the index
        ["--tmpfs-mib", "100", "--max-store-bytes", "1000"],
    ],
)
def test_a_bad_argument_is_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        soak_node.parse_args(argv)

    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage error:")
    assert err.count("\n") == 1


def test_a_tmpfs_store_has_no_budget() -> None:
    assert soak_node.parse_args([]).max_store_bytes == 96 * soak_node.MIB
    args = soak_node.parse_args(["--tmpfs-mib", "100"])
    assert (args.tmpfs_mib, args.max_store_bytes) == (100, 0)


def test_a_seed_is_chosen_when_none_is_given() -> None:
    assert isinstance(soak_node.parse_args([]).seed, int)
    assert soak_node.parse_args(["--seed", "7"]).seed == 7


def test_a_range_fault_comes_after_a_cut_it_can_meet() -> None:
    # WRONG_RANGE and IGNORE_RANGE only match the node's resume of a cut
    # body, so without a cut of their own they would rarely apply.
    rng = random.Random(3)
    for _ in range(200):
        faults = soak_node.random_faults(rng)
        kinds = [fault.kind for fault in faults]
        if kinds[-1] in (FaultKind.WRONG_RANGE, FaultKind.IGNORE_RANGE):
            assert kinds[0] is FaultKind.CUT
            assert faults[0].times == faults[1].times
        else:
            assert len(faults) == 1
        assert all(fault.times is not None for fault in faults)


def test_only_blobs_are_redirected() -> None:
    rng = random.Random(5)
    faults = [fault for _ in range(300) for fault in soak_node.random_faults(rng)]
    redirects = [fault for fault in faults if fault.kind is FaultKind.REDIRECT]
    assert redirects
    assert all(fault.path_contains == "/blobs/" for fault in redirects)
