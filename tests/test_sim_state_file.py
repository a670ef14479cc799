"""``tcr-mirror sim --state-file``: the simulated account survives a restart."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from support.processes import stop_process
from tcr_mirror.control.sim import Simulator
from tcr_mirror.control.sim._jwt import SigningKey
from tcr_mirror.control.sim._persist import (
    StateFileError,
    load,
    save,
)
from tcr_mirror.control.sim._state import InstanceToken, Replica, VpcLink
from tcr_mirror.control.sim._verify import Key

SECRET_ID = "AKIDstatefiletest000"
SECRET_KEY = "state-file-test-key-NEVER-PRINT"


def _simulator(signing_key: SigningKey | None = None) -> Simulator:
    return Simulator({SECRET_ID: Key(SECRET_KEY)}, seed=7, signing_key=signing_key)


def _busy_account() -> Simulator:
    simulator = _simulator()
    state = simulator.state
    registry_id = simulator.add_instance("saved")
    instance = state.instances[registry_id]
    instance.endpoint.move("Opened", 1000.0)
    instance.endpoint.policies.append({"CidrBlock": "10.0.0.0/8", "Description": "x"})
    instance.vpcs.append(
        VpcLink("vpc", "Running", 1001.0, vpc_id="vpc-1", subnet_id="subnet-1",
                access_ip="10.0.0.5", region_id=1)
    )  # fmt: skip
    instance.replicas.append(
        Replica("replica", "Running", 1002.0, replica_id="r-1", region_name="ap-tokyo")
    )
    instance.rules["rule-1"] = {"SrcNamespace": "team", "Regions": ["ap-tokyo"]}
    state.tokens["tok1"] = InstanceToken(
        "tok1", registry_id, "ci", True, 1003.0, 1003.0 + 3600
    )
    state.personal.password = "personal-password-7"
    state.personal.namespaces["team"] = 1004.0
    state.personal.repos["team/app"] = {"public": False, "description": "d"}
    state.personal.lifecycle["team"] = (10, 1005.0)
    return simulator


def test_an_account_comes_back_as_it_was_saved(tmp_path: Path) -> None:
    original = _busy_account()
    path = tmp_path / "state.json"
    save(original.state, path)

    saved = load(path)
    assert saved is not None
    key = saved.signing_key
    restored = _simulator(key)
    saved.restore_into(restored.state)

    assert restored.state.instances == original.state.instances
    assert restored.state.tokens == original.state.tokens
    assert restored.state.personal == original.state.personal
    assert key.kid == original.state.signing_key.kid
    assert key.certificate_pem() == original.state.signing_key.certificate_pem()


def test_the_file_is_private_and_replaced_whole(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save(_busy_account().state, path)
    first = path.read_text()
    save(_simulator().state, path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() != first
    assert json.loads(path.read_text())["instances"] == []
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_no_file_yet_leaves_a_fresh_account(tmp_path: Path) -> None:
    simulator = _simulator()
    path = tmp_path / "missing.json"
    assert load(path) is None
    assert simulator.state.instances == {}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"format": 99}',
        '{"format": 1, "signing_key": {"private_key": "x", "certificate": "y"}}',
    ],
)
def test_a_file_that_is_not_a_state_file_is_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(StateFileError):
        load(path)


def test_a_state_file_with_missing_parts_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    save(_busy_account().state, path)
    document = json.loads(path.read_text())
    del document["instances"][0]["endpoint"]
    path.write_text(json.dumps(document))
    with pytest.raises(StateFileError, match="not a simulator state file"):
        load(path)


# The CLI, as a process.


@contextmanager
def _sim(
    tmp_path: Path, state_file: Path, *instances: str
) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    env = {
        **os.environ,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }
    command = [sys.executable, "-m", "tcr_mirror", "sim", "--listen", "127.0.0.1:0",
               "--state-file", str(state_file),
               "--registry-cert-out", str(tmp_path / "cert.pem")]  # fmt: skip
    for name in instances:
        command += ["--instance", name]
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        announcement = json.loads(process.stderr.readline())
        yield process, announcement
    finally:
        stop_process(process, terminate=False)


def _stop(process: subprocess.Popen[str]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(timeout=20)


def test_the_cli_keeps_instances_and_key_across_a_restart(tmp_path: Path) -> None:
    state_file = tmp_path / "sim-state.json"
    with _sim(tmp_path, state_file, "kept-one") as (process, first):
        first_cert = (tmp_path / "cert.pem").read_bytes()
        assert _stop(process) == 0
    assert state_file.exists()

    # The same command line again, plus a new instance: "kept-one" is not
    # created twice, and the registry's root certificate stays valid.
    with _sim(tmp_path, state_file, "kept-one", "added-two") as (process, second):
        assert second["instances"]["kept-one"] == first["instances"]["kept-one"]
        assert set(second["instances"]) == {"kept-one", "added-two"}
        assert (tmp_path / "cert.pem").read_bytes() == first_cert
        assert _stop(process) == 0
    assert SECRET_KEY not in state_file.read_text()


def test_the_cli_refuses_a_broken_state_file_in_one_line(tmp_path: Path) -> None:
    state_file = tmp_path / "sim-state.json"
    state_file.write_text("{broken")
    env = {
        **os.environ,
        "TENCENTCLOUD_SECRET_ID": SECRET_ID,
        "TENCENTCLOUD_SECRET_KEY": SECRET_KEY,
    }
    done = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "sim", "--state-file", str(state_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith(f"tcr-mirror: error: {state_file}: not JSON")
