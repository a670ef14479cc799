"""``tcr-mirror control`` as a subprocess against ``tcr-mirror sim``."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from support.control_sim import SECRET_KEY, sim_env, sim_in_process, sim_process
from support.filesystems import fill, mounted_tmpfs
from support.processes import stop_process

ERROR_LINE = re.compile(
    r"^tcr-mirror: error: [A-Za-z.]+: .+ \(RequestId [0-9a-f-]{36}\)$"
)


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> object:
        return json.loads(self.out)


@dataclass
class Cli:
    endpoint: str
    instances: dict[str, str]
    workdir: Path
    outputs: list[str]

    @property
    def audit_log(self) -> Path:
        return self.workdir / "audit.jsonl"

    def command(self, *args: str, audit_log: Path | None = None) -> list[str]:
        """``tcr-mirror control`` with ``args``, against the simulator."""
        log = self.audit_log if audit_log is None else audit_log
        command = [sys.executable, "-m", "tcr_mirror", "control"]
        command += ["--endpoint", self.endpoint, "--audit-log", str(log)]
        return [*command, *args]

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> Run:
        done = subprocess.run(
            self.command(*args),
            env=env or sim_env(),
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        self.outputs += [done.stdout, done.stderr]
        return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="module")
def cli(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cli]:
    with sim_process("cli-one", "cli-two") as sim:
        workdir = tmp_path_factory.mktemp("cli")
        instances = dict(sim["instances"])  # type: ignore[call-overload]
        yield Cli(str(sim["endpoint"]), instances, workdir, [])


NODE_SECRET = "node-secret-for-cli-test"


def node_secret_file(cli: Cli) -> Path:
    secret_file = cli.workdir / "node-secret"
    secret_file.write_text(NODE_SECRET + "\n")
    return secret_file


@dataclass
class Serving:
    """A running ``tcr-mirror control serve``: its ``control_serve_listening``
    event, and the lines of its stderr so far."""

    process: subprocess.Popen[str]
    listening: dict[str, Any]
    stderr: list[str]

    @property
    def credentials_url(self) -> str:
        return f"http://{self.listening['listen']}/v1/credentials"


@contextlib.contextmanager
def serving(cli: Cli, *args: str, audit_log: Path | None = None) -> Iterator[Serving]:
    """``control serve`` for cli-two with ``args``, once it listens; stopped
    at the end (its stderr read on meanwhile, so that it never blocks)."""
    command = cli.command(
        "serve", "--listen", "127.0.0.1:0", "--registry", cli.instances["cli-two"],
        "--node-secret-file", str(node_secret_file(cli)), *args,
        audit_log=audit_log,
    )  # fmt: skip
    proc = subprocess.Popen(
        command, env=sim_env(), stderr=subprocess.PIPE, text=True, cwd=cli.workdir
    )
    captured: list[str] = []
    drain = threading.Thread(
        target=lambda: captured.extend(proc.stderr or []), daemon=True
    )
    try:
        assert proc.stderr is not None
        ready: dict[str, Any] = {}
        for _ in range(50):
            line = proc.stderr.readline()
            captured.append(line)
            if '"control_serve_listening"' in line:
                ready = json.loads(line)
                break
        assert ready, "".join(captured)
        drain.start()
        yield Serving(proc, ready, captured)
    finally:
        stop_process(proc, drain=drain)


def assert_one_error_line(run: Run) -> None:
    assert run.code != 0
    assert run.out == ""
    assert "Traceback" not in run.err
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert ERROR_LINE.match(lines[0]), lines[0]


def test_instances_list_text_and_json(cli: Cli) -> None:
    text = cli("instances", "list")
    assert text.code == 0, text.err
    header, *rows = text.out.splitlines()
    assert header.split()[:3] == ["RegistryId", "RegistryName", "Status"]
    assert {row.split()[0] for row in rows} == set(cli.instances.values())

    as_json = cli("instances", "list", "--output", "json")
    body = as_json.json()
    assert isinstance(body, dict)
    assert body["TotalCount"] == 2
    assert re.fullmatch(r"[0-9a-f-]{36}", body["RequestId"])


def test_token_lifecycle_keeps_the_token_out_of_output(cli: Cli) -> None:
    rid = cli.instances["cli-one"]
    token_file = cli.workdir / "ci.json"

    created = cli(
        "tokens", "create", rid, "--type", "longterm", "--desc", "ci",
        "--token-file", str(token_file),
    )  # fmt: skip
    assert created.code == 0, created.err
    saved = json.loads(token_file.read_text())
    token = saved["password"]
    assert len(token) > 100
    assert token not in created.out + created.err
    assert str(token_file) in created.out

    disabled = cli("tokens", "disable", rid, saved["token_id"])
    assert disabled.code == 0, disabled.err
    listed = cli("--output", "json", "tokens", "list", rid).json()
    assert isinstance(listed, dict)
    assert [(t["Id"], t["Enabled"]) for t in listed["Tokens"]] == [
        (saved["token_id"], False)
    ]
    assert token not in cli.audit_log.read_text()


def test_token_file_readable_by_others_is_made_private(cli: Cli) -> None:
    token_file = cli.workdir / "shared.json"
    token_file.write_text("{}\n")
    token_file.chmod(0o644)

    created = cli(
        "tokens", "create", cli.instances["cli-two"], "--token-file", str(token_file)
    )

    assert created.code == 0, created.err
    assert "password" in json.loads(token_file.read_text())
    assert oct(token_file.stat().st_mode & 0o777) == "0o600"


def test_unwritable_secret_file_fails_apply_with_a_report(cli: Cli) -> None:
    desired = cli.workdir / "secret-nowhere.toml"
    desired.write_text(
        f'[[instance]]\nregistry_id = "{cli.instances["cli-two"]}"\n'
        'region = "ap-guangzhou"\n[[instance.token]]\ndescription = "lost"\n'
        'secret_file = "no-such-dir/lost.json"\n'
    )

    applied = cli("apply", str(desired))

    assert applied.code == 1
    assert "Traceback" not in applied.err
    failed = [line for line in applied.out.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1, applied.out
    assert "created but not saved" in failed[0]
    assert "no-such-dir/lost.json" in failed[0]


def test_stale_secret_file_is_replaced_private(cli: Cli) -> None:
    secret = cli.workdir / "stale.json"
    stale = cli.workdir / "stale.json.tmp"
    stale.write_text("{}")
    stale.chmod(0o644)
    desired = cli.workdir / "stale.toml"
    desired.write_text(
        f'[[instance]]\nregistry_id = "{cli.instances["cli-two"]}"\n'
        'region = "ap-guangzhou"\n[[instance.token]]\ndescription = "stale"\n'
        'secret_file = "stale.json"\n'
    )

    applied = cli("apply", str(desired))

    assert applied.code == 0, applied.err
    assert oct(secret.stat().st_mode & 0o777) == "0o600"


def test_tcr_error_is_one_line_and_nonzero(cli: Cli) -> None:
    run = cli("tokens", "delete", cli.instances["cli-one"], "no-such-token")

    assert_one_error_line(run)
    assert run.code == 1
    assert "ResourceNotFound" in run.err


async def run_cli(endpoint: str, workdir: Path, *args: str) -> Run:
    """``tcr-mirror control`` against a simulator served by this trio run."""
    command = [sys.executable, "-m", "tcr_mirror", "control", "--endpoint", endpoint]
    command += ["--audit-log", str(workdir / "audit.jsonl"), *args]
    done = await trio.run_process(
        command, env=sim_env(), cwd=workdir, capture_stdout=True,
        capture_stderr=True, check=False,
    )  # fmt: skip
    return Run(done.returncode, done.stdout.decode(), done.stderr.decode())


async def test_token_create_with_a_lost_answer_says_the_outcome_is_unknown(
    tmp_path: Path,
) -> None:
    async with sim_in_process() as sim:
        rid = sim.simulator.add_instance("lost-answer")
        sim.simulator.state.lose_answer("CreateInstanceToken", times=4)

        run = await run_cli(
            sim.endpoint, tmp_path, "tokens", "create", rid, "--type", "longterm",
            "--token-file", str(tmp_path / "token.json"),
        )  # fmt: skip

        tokens = [t for t in sim.simulator.state.tokens.values() if t.token_id]
    assert run.code == 1
    assert run.out == ""
    assert "Traceback" not in run.err
    assert len(run.err.splitlines()) == 1, run.err
    assert run.err.startswith("tcr-mirror: error: ClientError.NetworkError: ")
    assert "CreateInstanceToken may or may not have taken effect" in run.err
    assert len(tokens) == 1


async def test_list_commands_read_every_page(tmp_path: Path) -> None:
    from tcr_mirror.control.sim._enterprise import create_instance_token

    async with sim_in_process(instance_quota=200) as sim:
        state = sim.simulator.state
        ids = {sim.simulator.add_instance(f"page-{n:03d}") for n in range(130)}
        rid = min(ids)
        for n in range(250):
            params = {"RegistryId": rid, "TokenType": "longterm", "Desc": f"t{n}"}
            create_instance_token(state, params)

        instances = await run_cli(sim.endpoint, tmp_path, "instances", "list")
        tokens = await run_cli(
            sim.endpoint, tmp_path, "--output", "json", "tokens", "list", rid
        )

    assert instances.code == 0, instances.err
    assert {line.split()[0] for line in instances.out.splitlines()[1:]} == ids
    assert tokens.code == 0, tokens.err
    body = json.loads(tokens.out)
    assert body["TotalCount"] == 250
    assert sorted(t["Desc"] for t in body["Tokens"]) == sorted(
        f"t{n}" for n in range(250)
    )


async def test_token_with_unreadable_exp_time_is_saved_and_one_line(
    tmp_path: Path,
) -> None:
    from tcr_mirror.control.sim import serve_http

    answer = {
        "Username": "100012345678", "Token": "a.b.c", "TokenId": "t1",
        "ExpTime": "soon", "RequestId": "4b3cf1cc-7d6b-4f1f-9d5d-1bd0c8f3e0a1",
    }  # fmt: skip

    async def tcr(*request: object) -> tuple[int, list[tuple[str, str]], bytes]:
        return 200, [], json.dumps({"Response": answer}).encode()

    token_file = tmp_path / "token.json"
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(serve_http, tcr, "127.0.0.1", 0)
        endpoint = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        run = await run_cli(
            endpoint, tmp_path, "tokens", "create", "tcr-abcdefgh",
            "--type", "longterm", "--token-file", str(token_file),
        )  # fmt: skip
        nursery.cancel_scope.cancel()

    assert run.code == 2
    assert run.err.splitlines() == [
        f"tcr-mirror: error: token created and written to {token_file}, "
        "but its ExpTime is not a time: 'soon'"
    ]
    saved = json.loads(token_file.read_text())
    assert (saved["password"], saved["expires_at"]) == ("a.b.c", None)


def test_wrong_key_is_tcr_signature_failure(cli: Cli) -> None:
    env = sim_env()
    env["TENCENTCLOUD_SECRET_KEY"] = "not-the-key"

    run = cli("instances", "list", env=env)

    assert_one_error_line(run)
    assert "AuthFailure.SignatureFailure" in run.err


def test_missing_credentials_is_a_usage_error(cli: Cli) -> None:
    env = sim_env()
    del env["TENCENTCLOUD_SECRET_KEY"]

    run = cli("instances", "list", env=env)

    assert run.code == 2
    assert run.err.strip() == (
        "tcr-mirror: error: environment variable TENCENTCLOUD_SECRET_KEY is not set"
    )


def test_bad_argument_is_a_usage_error(cli: Cli) -> None:
    one, two = cli.instances["cli-one"], cli.instances["cli-two"]

    run = cli("replication", "rule", one, two, "--name", "r", "--filter", "oops")

    assert run.code == 2
    assert run.err.strip() == (
        "tcr-mirror: error: --filter wants TYPE=VALUE (name, tag, resource): 'oops'"
    )


def test_replication_rule_is_audited(cli: Cli) -> None:
    one, two = cli.instances["cli-one"], cli.instances["cli-two"]

    run = cli(
        "replication", "rule", one, two, "--name", "to-two",
        "--destination-region", "ap-guangzhou", "--filter", "name=team/**",
    )  # fmt: skip

    assert run.code == 0, run.err
    (event,) = [
        json.loads(line)
        for line in cli.audit_log.read_text().splitlines()
        if '"eventName":"ManageReplication"' in line
    ]
    params = json.loads(event["requestParameters"])
    assert params["Rule"]["Filters"] == [{"Type": "name", "Value": "team/**"}]


def test_endpoint_and_policies(cli: Cli) -> None:
    rid = cli.instances["cli-two"]

    assert cli("endpoint", "enable", rid).code == 0
    status = None
    for _ in range(50):
        status = cli("endpoint", "status", rid)
        if "Opened" in status.out:
            break
    assert status is not None
    assert "Status: Opened" in status.out
    added = cli("policies", "add", rid, "10.1.0.0/16", "--description", "lab")
    assert added.code == 0, added.err
    listed = cli("policies", "list", rid)
    assert re.search(r"^0\s+10\.1\.0\.0/16\s+lab\s", listed.out, re.M), listed.out


def test_plan_apply_apply(cli: Cli) -> None:
    rid = cli.instances["cli-one"]
    desired = cli.workdir / "desired.toml"
    desired.write_text(
        f'[[instance]]\nregistry_id = "{rid}"\nregion = "ap-guangzhou"\n'
        '[[instance.token]]\ndescription = "from-plan"\n'
        '[[instance.vpc]]\nvpc_id = "vpc-74ffq7ov"\nsubnet_id = "subnet-kpmi5ji6"\n'
    )

    planned = cli("plan", str(desired))
    assert planned.code == 0, planned.err
    assert planned.out.splitlines()[0] == "2 change(s):"
    applied = cli("apply", str(desired), "--poll-interval", "0.1")
    assert applied.code == 0, applied.err
    assert "2 done, 0 failed, 0 not attempted" in applied.out
    again = cli("--output", "json", "apply", str(desired))
    body = again.json()
    assert isinstance(body, dict)
    assert body["nothing_to_do"] is True
    assert cli("apply", str(desired)).out.strip() == (
        "nothing to do: TCR matches the desired state"
    )


def test_bad_desired_file_is_one_line(cli: Cli) -> None:
    desired = cli.workdir / "bad.toml"
    desired.write_text("[[instance]]\nregion = 'ap-guangzhou'\n")

    run = cli("plan", str(desired))

    assert run.code == 2
    assert run.err.strip() == (
        "tcr-mirror: error: instance[0].registry_id: expected a non-empty string"
    )


def test_audit_query_and_verify(cli: Cli) -> None:
    cli("tokens", "delete", cli.instances["cli-two"], "nope")

    errors = cli("audit", "--errors", "--output", "json").json()
    assert isinstance(errors, list)
    assert errors
    assert all(e["errorCode"] not in (0, "") for e in errors)
    assert {e["resourceType"] for e in errors} == {"tcr"}
    named = cli("audit", "--event", "DescribeInstances").out.splitlines()
    assert named
    assert all("DescribeInstances" in line for line in named)
    assert cli("audit", "--since", "2999-01-01T00:00:00").out.strip() == "(no events)"

    ok = cli("audit", "verify")
    assert ok.code == 0, ok.err
    assert "chain intact" in ok.out


def test_audit_event_with_unreadable_time_is_one_line(cli: Cli, tmp_path: Path) -> None:
    log = tmp_path / "odd-time.jsonl"
    events = [
        {"seq": 0, "eventName": "DescribeInstances", "eventTime": 1735877397},
        {"seq": 1, "eventName": "CreateInstanceToken", "eventTime": "soon"},
    ]
    log.write_text("".join(json.dumps(e) + "\n" for e in events))

    since = cli("audit", "--log", str(log), "--since", "0")
    listed = cli("audit", "--log", str(log))

    assert since.code == 2
    assert since.err.splitlines() == [
        f"tcr-mirror: error: audit log {log}: event seq 1 has an eventTime "
        "that is not unix seconds: 'soon'"
    ]
    assert listed.code == 0, listed.err
    assert "'soon'" in listed.out.splitlines()[1]


def test_node_secret_file_not_utf8_is_one_line(cli: Cli) -> None:
    secret_file = cli.workdir / "binary-secret"
    secret_file.write_bytes(b"\xff\xfe\x00secret")

    run = cli(
        "serve", "--listen", "127.0.0.1:0", "--registry", cli.instances["cli-two"],
        "--node-secret-file", str(secret_file),
    )  # fmt: skip

    assert run.code == 2
    assert run.err.splitlines() == [
        f"tcr-mirror: error: --node-secret-file {secret_file} is not UTF-8 text"
    ]


def test_audit_verify_names_the_tampered_line(cli: Cli, tmp_path: Path) -> None:
    lines = cli.audit_log.read_bytes().splitlines(keepends=True)
    assert len(lines) >= 3
    lines[1] = lines[1].replace(b'"apiVersion":"3.0"', b'"apiVersion":"9.9"')
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_bytes(b"".join(lines))

    run = cli("audit", "verify", "--log", str(tampered))

    assert run.code == 1
    assert run.err.strip().endswith(
        "line 2: edited: its hash does not match its content"
    )


def first_credentials(server: Serving, host: str) -> httpx.Response:
    """The node credentials for ``host`` once the first token is in (a
    503 until then; bounded to about 5 s)."""
    for _ in range(100):
        answer = httpx.get(
            server.credentials_url,
            params={"registry": host},
            headers={"Authorization": f"Bearer {NODE_SECRET}"},
        )
        if answer.status_code != 503:
            break
        time.sleep(0.05)
    return answer


def test_serve_hands_out_tokens(cli: Cli) -> None:
    rid = cli.instances["cli-two"]
    with serving(cli) as server:
        host = "cli-two.tencentcloudcr.com"
        assert server.listening["registries"] == {host: rid}
        good = first_credentials(server, host)
        assert good.status_code == 200, good.text
        bad = httpx.get(server.credentials_url, params={"registry": host})
        assert bad.status_code == 401
    assert server.process.returncode == 0
    token = good.json()["password"]
    assert token not in "".join(server.stderr)
    assert token not in cli.audit_log.read_text()
    cli.outputs += server.stderr


def test_serve_logs_only_json_lines(cli: Cli) -> None:
    with serving(cli) as server:
        answer = first_credentials(server, "cli-two.tencentcloudcr.com")
        assert answer.status_code == 200, answer.text
    lines = [line for line in server.stderr if line.strip()]
    assert any('"token_renewed"' in line for line in lines)
    for line in lines:
        assert isinstance(json.loads(line), dict), line
    cli.outputs += server.stderr


def test_serve_on_a_taken_port_is_one_line(cli: Cli) -> None:
    secret_file = node_secret_file(cli)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        run = cli(
            "serve", "--listen", f"127.0.0.1:{port}",
            "--registry", cli.instances["cli-two"],
            "--node-secret-file", str(secret_file),
        )  # fmt: skip

    assert run.code == 2
    assert run.err.splitlines()[-1] == (
        f"tcr-mirror: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in run.err


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, unmounted at teardown."""
    with mounted_tmpfs(tmp_path / "fs", "size=1m") as mountpoint:
        yield mountpoint


def test_serve_keeps_serving_when_the_audit_disk_fills(
    cli: Cli, small_filesystem: Path
) -> None:
    audit_log = small_filesystem / "audit.jsonl"
    # One-hour tokens renewed every ~2 s, so renewals meet the full disk soon.
    with serving(cli, "--renew-fraction", "0.0005", audit_log=audit_log) as server:
        url = server.credentials_url
        host = "cli-two.tencentcloudcr.com"
        auth = {"Authorization": f"Bearer {NODE_SECRET}"}

        def credentials() -> httpx.Response:
            return httpx.get(url, params={"registry": host}, headers=auth)

        for _ in range(100):
            if credentials().status_code == 200:
                break
            time.sleep(0.05)
        fill(small_filesystem / "filler")

        captured = server.stderr
        for _ in range(300):
            if any('"token_renewal_failed"' in line for line in captured):
                break
            if server.process.poll() is not None:
                break
            time.sleep(0.05)
        assert server.process.poll() is None, "".join(captured)
        assert any('"token_renewal_failed"' in line for line in captured)
        assert credentials().status_code == 200
    assert "Traceback" not in "".join(server.stderr)


def test_full_audit_disk_fails_a_command_in_one_line(
    cli: Cli, small_filesystem: Path
) -> None:
    audit_log = small_filesystem / "audit.jsonl"
    audit_log.touch()
    fill(small_filesystem / "filler")

    run = cli("--audit-log", str(audit_log), "instances", "list")

    assert run.code == 1
    assert "Traceback" not in run.err
    assert run.err.splitlines() == [
        "tcr-mirror: error: DescribeInstances was sent to TCR but cannot be "
        f"recorded: cannot write audit log {audit_log}: No space left on device"
    ]


def test_region_no_header_can_carry_is_one_line_and_audited(cli: Cli) -> None:
    run = cli("instances", "list", "--region", "ap-guangzhöu")

    assert run.code == 1
    assert run.err.splitlines() == [
        "tcr-mirror: error: ClientError.InvalidHeader: the region is not "
        "printable ASCII, so no HTTP header can carry it; DescribeInstances "
        "was not sent"
    ]
    last = json.loads(cli.audit_log.read_text().splitlines()[-1])
    assert (last["eventName"], last["errorCode"], last["eventRegion"]) == (
        "DescribeInstances",
        "ClientError.InvalidHeader",
        "ap-guangzhöu",
    )


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("http://127.0.0.1:99999", "Port out of range 0-65535"),
        ("http://user:pass-word-1@[::1", "Invalid port: ':1'"),
    ],
)
def test_malformed_endpoint_is_a_usage_error(
    cli: Cli, endpoint: str, reason: str
) -> None:
    run = cli("instances", "list", "--endpoint", endpoint)

    assert run.code == 2
    assert run.err.splitlines() == [
        f"tcr-mirror: error: --endpoint is not a usable URL: {reason}"
    ]


@pytest.mark.parametrize("interval", ["-1", "nan", "inf"])
def test_poll_interval_not_seconds_is_refused_before_any_change(
    cli: Cli, interval: str
) -> None:
    desired = cli.workdir / "poll.toml"
    desired.write_text(
        f'[[instance]]\nregistry_id = "{cli.instances["cli-one"]}"\n'
        'region = "ap-guangzhou"\n[instance.endpoint]\nenabled = true\n'
    )
    before = cli.audit_log.read_text() if cli.audit_log.exists() else ""

    run = cli("apply", str(desired), "--poll-interval", interval)

    assert run.code == 2
    assert "Traceback" not in run.err
    assert run.err.splitlines()[-1] == (
        "tcr-mirror control apply: error: argument --poll-interval: "
        f"not a number of seconds: '{interval}'"
    )
    after = cli.audit_log.read_text() if cli.audit_log.exists() else ""
    assert after == before


def test_no_secret_anywhere(cli: Cli) -> None:
    """Runs last in this module: every output so far, and the audit log."""
    assert cli.outputs
    everything = "".join(cli.outputs) + cli.audit_log.read_text()
    assert SECRET_KEY not in everything
    assert "TC3-HMAC-SHA256" not in everything  # no Authorization header either
