"""The node's stderr stays one JSON event per line, whatever is logged.

Run in a process of its own, set up as the node sets up its logging: log
collectors split stderr on newlines, so a bare traceback or warning would
become many broken events.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import httpx

from support.images import push_image
from support.node import NodeFactory
from support.registry import Registry

_PROGRAM = textwrap.dedent(
    """
    import logging, warnings
    from tcr_mirror._logging import configure_logging

    configure_logging("debug")
    log = logging.getLogger("tcr_mirror.test")
    log.info("odd_values", extra={"ratio": float("nan"), "by_pair": {(1, 2): 3}})
    log.info("bad %s %s", "one-argument")
    logging.getLogger("somelibrary").warning("first line\\nsecond line")
    logging.getLogger("somelibrary").info("below the floor")
    warnings.warn("a warning\\nover two lines")
    try:
        b'{"token": "s3cr3t-token", "bad": "\\xff"}'.decode()
    except UnicodeDecodeError:
        log.exception("token_unreadable")
    raise RuntimeError("crash\\nwith a second line")
    """
)


def run_logging_program() -> tuple[int, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return done.returncode, done.stderr.decode().splitlines()


def parse(lines: list[str]) -> list[dict[str, Any]]:
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return events


def test_every_stderr_line_is_one_json_event() -> None:
    status, lines = run_logging_program()

    events = parse(lines)
    names = [event["event"] for event in events]
    assert status == 1
    assert names[:3] == ["odd_values", "bad %s %s", "first line\nsecond line"]
    assert events[0]["ratio"] == "nan"
    assert "below the floor" not in names
    assert any("a warning\nover two lines" in name for name in names)
    unreadable = next(e for e in events if e["event"] == "token_unreadable")
    assert unreadable["error"].startswith("UnicodeDecodeError: 'utf-8' codec")
    assert not [line for line in lines if "s3cr3t" in line]
    crash = events[-1]
    assert crash["event"] == "process_crashed"
    assert crash["level"] == "critical"
    assert "crash\nwith a second line" in crash["traceback"]


def test_request_lines_are_logged_at_debug_only(
    registry: Registry, node_factory: NodeFactory
) -> None:
    image = push_image(registry, "app", "v1", layer_sizes=[100])
    quiet = node_factory("--upstream", registry.url, "--log-level", "info")
    chatty = node_factory("--upstream", registry.url)
    for node in (quiet, chatty):
        with httpx.Client(base_url=node.url) as client:
            assert client.get("/v2/app/manifests/v1").status_code == 200
            for digest in image.blobs:
                assert client.get(f"/v2/app/blobs/{digest}").status_code == 200
        # A request is logged once answered: stopped, the log is complete.
        assert node.stop() == 0

    requests = [e for e in chatty.events() if e.get("event") == "request"]
    assert len(requests) == 1 + len(image.blobs)
    assert {e["level"] for e in requests} == {"debug"}
    assert not [e for e in quiet.events() if e.get("event") == "request"]
    assert not [e for e in quiet.events() if e["level"] == "debug"]
    assert len(quiet.events()) == len(quiet.log_text().splitlines())
