"""``tcr-mirror containerd-config``: rendering, decisions, files, and containerd.

Rendering, the carry-over of a replaced configuration and the install/undo
decisions are pure and tested without files; the file handling runs on
real files in tmp dirs, including runs killed at every step; the CLI's
error cases run the installed ``tcr-mirror`` command; and the last tests
let a real containerd pull through the hosts.toml files the command wrote.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.containerd import CONTAINERD_USER_AGENT_PREFIX, Containerd
from support.images import push_image
from support.registry import Registry, free_port
from support.tls import TlsFiles
from tcr_mirror.cli import main
from tcr_mirror.containerd import (
    BACKUP_NAME,
    MARKER,
    Carried,
    HostsConfigError,
    InstallStep,
    UndoStep,
    carry_over,
    check_mirror_url,
    check_registry,
    host_dir_names,
    install_step,
    is_ours,
    redact,
    render_hosts_toml,
    undo_step,
)

MIRROR = "http://127.0.0.1:5000"
TCR_MIRROR = Path(sys.executable).with_name("tcr-mirror")
PULL_ONLY = {"capabilities": ["pull", "resolve"]}
SECRET = "s3cr3t-pw"

# Rendering (pure).


def _parsed(registry: str, mirror: str = MIRROR, **options: Any) -> dict[str, Any]:
    return tomllib.loads(render_hosts_toml(registry, mirror, **options))


def test_named_registry_falls_back_to_itself_over_https() -> None:
    text = render_hosts_toml("ccr.ccs.tencentyun.com", MIRROR)

    assert text.startswith(MARKER + "\n")
    assert tomllib.loads(text) == {
        "server": "https://ccr.ccs.tencentyun.com",
        "host": {MIRROR: PULL_ONLY},
    }


def test_docker_hub_falls_back_to_its_api_host() -> None:
    assert _parsed("docker.io")["server"] == "https://registry-1.docker.io"


@pytest.mark.parametrize(
    "registry", ["_default", "127.0.0.1:5001", "localhost:5000", "[::1]:5000"]
)
def test_default_and_loopback_leave_server_to_containerd(registry: str) -> None:
    parsed = _parsed(registry)

    assert "server" not in parsed
    assert parsed["host"] == {MIRROR: PULL_ONLY}


def test_skip_verify_and_url_normalisation() -> None:
    parsed = _parsed("ghcr.io", "https://Mirror.local:8443/", skip_verify=True)

    assert parsed["host"] == {
        "https://Mirror.local:8443": {
            "capabilities": ["pull", "resolve"],
            "skip_verify": True,
        }
    }


@pytest.mark.parametrize(
    "name",
    ["", "a/b", "..", ".", "-a.com", "a-.com", "a..com", "a.com:0", "a.com:65536",
     "a.com:x", "a.com:", "a b", "[zz]:1", "[::1", "[::1]x", "[::1]:", "_other",
     "a.com/../x", "a.com_5000_", "a.com:\u00b9", "a.com:\u0661"],
)  # fmt: skip
def test_bad_registry_names_are_refused(name: str) -> None:
    with pytest.raises(HostsConfigError) as info:
        check_registry(name)

    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name", ["ghcr.io", "a.com:443", "10.0.0.1:5000", "[2001:db8::1]:5000", "host"]
)
def test_good_registry_names_pass_unchanged(name: str) -> None:
    assert check_registry(name) == name


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1:5000", "127.0.0.1:5000", "http://", "http://h/v2",
     "http://h?x=1", "http://h#f", "http://u:p@h", "http://h:99999", "http://a b"],
)  # fmt: skip
def test_bad_mirror_urls_are_refused(url: str) -> None:
    with pytest.raises(HostsConfigError) as info:
        check_mirror_url(url)

    assert "\n" not in str(info.value)


@given(st.text(max_size=40))
def test_any_registry_name_renders_valid_toml_or_a_clean_error(name: str) -> None:
    try:
        text = render_hosts_toml(name, MIRROR)
    except HostsConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert tomllib.loads(text)["host"] == {MIRROR: PULL_ONLY}
    assert "/" not in name
    assert name not in ("", ".", "..")


@given(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1))
def test_any_carried_string_survives_the_toml_round_trip(value: str) -> None:
    carried = Carried(server=value, settings={"header": {value: [value, "x"]}})

    parsed = _parsed("ghcr.io", carried=carried)

    assert parsed["server"] == value
    assert parsed["header"] == {value: [value, "x"]}


# Carrying over the replaced configuration (pure).

FOREIGN_FULL = b"""
server = "https://ghcr.example:8443/base"
override_path = true
ca = "ca.pem"
client = [["node.cert", "node.key"], "both.pem"]
skip_verify = false
capabilities = ["pull", "resolve", "push"]
dial_timeout = "3s"
ignored_by_containerd = 1

[header]
  Authorization = "Bearer s3cr3t-pw"
  X-Trace = ["a", "b"]

[host."https://corp-mirror.example"]
  capabilities = ["pull"]
  ca = ["/etc/corp/ca.pem"]

[host."https://ghcr.example:8443"]
  client = "host.pem"
  header = { X-Host = "1" }
"""


def test_a_foreign_file_is_carried_over_whole() -> None:
    carried = carry_over(FOREIGN_FULL, ["ca.crt"])

    assert carried == Carried(
        server="https://ghcr.example:8443/base",
        settings={
            "capabilities": ["pull", "resolve", "push"],
            "ca": "ca.pem",
            "client": [["node.cert", "node.key"], "both.pem"],
            "skip_verify": False,
            "header": {"Authorization": "Bearer s3cr3t-pw", "X-Trace": ["a", "b"]},
            "override_path": True,
            "dial_timeout": "3s",
        },
        hosts=(
            ("https://corp-mirror.example", {"capabilities": ["pull"], "ca": [
                "/etc/corp/ca.pem"]}),
            ("https://ghcr.example:8443", {"client": "host.pem", "header": {
                "X-Host": "1"}}),
        ),
    )  # fmt: skip


def test_our_file_puts_the_mirror_first_and_keeps_the_rest() -> None:
    parsed = _parsed("ghcr.example:8443", carried=carry_over(FOREIGN_FULL))
    expected = tomllib.loads(FOREIGN_FULL.decode())
    del expected["ignored_by_containerd"]

    assert list(parsed["host"]) == [
        MIRROR,
        "https://corp-mirror.example",
        "https://ghcr.example:8443",
    ]
    assert parsed["host"].pop(MIRROR) == PULL_ONLY
    assert parsed == expected


def test_docker_style_cert_files_become_the_servers_settings() -> None:
    names = ["a.crt", "b.crt", "client.cert", "client.key", "notes", "solo.cert"]

    for original in (None, b""):
        assert carry_over(original, names) == Carried(
            settings={
                "ca": ["a.crt", "b.crt"],
                "client": [["client.cert", "client.key"], "solo.cert"],
            }
        )
    assert carry_over(None, ["notes", BACKUP_NAME]) == Carried()


@pytest.mark.parametrize(
    "foreign",
    [b"server = 5", b'ca = 5', b'client = [["a"]]',
     b'skip_verify = "yes"', b'capabilities = ["fetch"]', b'dial_timeout = "3x"',
     b'header = { X = 1 }', b"host = 1", b'[host."h"]\nca = [1]'],
)  # fmt: skip
def test_a_file_containerd_would_reject_gives_way_to_the_cert_files(
    foreign: bytes,
) -> None:
    assert carry_over(foreign, ["ca.crt"]) == Carried(settings={"ca": ["ca.crt"]})


# Files tomllib cannot read, although containerd may: go-toml skips a byte
# order mark, for one. The duplicate key is quoted in tomllib's message.
UNREADABLE = [
    b"server = [",
    b"\xff = 1",
    b'\xef\xbb\xbfserver = "https://ghcr.io"\n[host."https://m.example"]\n',
    b"server = " + b"[" * 5000 + b"]" * 5000 + b"\n",
    f'[host."https://u:{SECRET}@m.example"]\n'.encode() * 2,
]


@pytest.mark.parametrize("foreign", UNREADABLE)
def test_a_file_tomllib_cannot_read_is_refused(foreign: bytes) -> None:
    with pytest.raises(HostsConfigError) as caught:
        carry_over(foreign, ["ca.crt"])

    assert SECRET not in str(caught.value)


def test_capabilities_without_a_server_are_dropped() -> None:
    # containerd gives the registry every capability when the file names no
    # server; beside the server we write, these would take push away.
    foreign = b'capabilities = ["pull", "resolve"]\n[host."https://m.example"]\n'

    carried = carry_over(foreign)
    parsed = _parsed("ghcr.io", carried=carried)

    assert carried.settings == {}
    assert "capabilities" not in parsed


def test_override_path_without_a_server_is_dropped() -> None:
    # containerd ignores it there; kept beside our server it would cut /v2.
    carried = carry_over(b'override_path = true\nca = "x.pem"\n')

    assert carried == Carried(settings={"ca": "x.pem"})


def test_a_foreign_entry_for_our_mirror_is_replaced_by_ours() -> None:
    carried = carry_over(f'[host."{MIRROR}"]\n  skip_verify = true\n'.encode())

    assert _parsed("ghcr.io", carried=carried)["host"] == {MIRROR: PULL_ONLY}


# Host entries that only containerd 1.5 to 1.7 reads: 2.0+ lists hosts by
# their table headers, so it skips dotted keys and inline tables.

ENTRY_FORMS = b"""
host."https://dotted.example".ca = "d.pem"
host."https://inline.example" = { capabilities = ["pull"] }
note = \"""
[host."https://in-a-string.example"]
\"""

[host."https://header.example"]  # [host."https://in-a-comment.example"]
  client = [
    ["a.cert", "a.key"],
  ]

[ "host" . 'https://sub-table.example'.header ]
  X-Sub = "1"
"""


def test_hosts_without_a_table_header_are_carried_apart() -> None:
    carried = carry_over(ENTRY_FORMS)

    assert carried.hosts == (
        ("https://header.example", {"client": [["a.cert", "a.key"]]}),
        ("https://sub-table.example", {"header": {"X-Sub": "1"}}),
    )
    assert carried.unlisted == (
        ("https://dotted.example", {"ca": "d.pem"}),
        ("https://inline.example", {"capabilities": ["pull"]}),
    )


def test_unlisted_hosts_follow_the_mirror_as_dotted_keys() -> None:
    # Under [host], which 2.0+ passes over; 1.x puts an inline table first.
    dotted = ("https://dotted.example", {"ca": "d.pem", "header": {"A": SECRET}})
    carried = Carried(
        hosts=(("https://header.example", {}),),
        unlisted=(dotted, ("https://bare.example", {}), (MIRROR, {"ca": "x"})),
    )

    text = render_hosts_toml("ghcr.io", MIRROR, carried=carried)
    shown = render_hosts_toml("ghcr.io", MIRROR, carried=carried, redact_secrets=True)

    assert text.endswith(
        '\n[host."https://header.example"]\n'
        "\n[host]\n"
        '  "https://dotted.example".ca = "d.pem"\n'
        f'  "https://dotted.example".header = {{ "A" = "{SECRET}" }}\n'
        '  "https://bare.example".capabilities = ["pull", "resolve", "push"]\n'
    )
    assert carry_over(text.encode()) == Carried(
        server="https://ghcr.io",
        hosts=((MIRROR, PULL_ONLY), ("https://header.example", {})),
        unlisted=(dotted, ("https://bare.example", _ALL_CAPABILITIES)),
    )
    assert SECRET not in shown


_ALL_CAPABILITIES = {"capabilities": ["pull", "resolve", "push"]}
_ENTRY = {
    "header": '[host.{key}]\n  ca = "x"\n',
    "sub-table": '[host.{key}.header]\n  X = "1"\n',
    "dotted": 'host.{key}.ca = "x"\n',
    "inline": 'host.{key} = {{ ca = "x" }}\n',
}


@given(
    st.lists(
        st.tuples(
            st.text(st.characters(blacklist_categories=["Cs", "Cc"]), max_size=12),
            st.sampled_from(sorted(_ENTRY)),
            st.booleans(),
        ),
        max_size=6,
        unique_by=lambda entry: entry[0],
    )
)
def test_only_hosts_named_by_a_table_header_are_listed(
    entries: list[tuple[str, str, bool]],
) -> None:
    # Dotted keys and inline tables must come before the first header.
    top = [entry for entry in entries if entry[1] in ("dotted", "inline")]
    tables = [entry for entry in entries if entry not in top]
    document = "".join(
        _ENTRY[form].format(key=_toml_key(url, literal))
        for url, form, literal in top + tables
    )

    carried = carry_over(document.encode())

    assert [url for url, _ in carried.hosts] == [url for url, _, _ in tables]
    assert [url for url, _ in carried.unlisted] == [url for url, _, _ in top]


def _toml_key(text: str, literal: bool) -> str:
    return (
        f"'{text}'"
        if literal and "'" not in text
        else json.dumps(text, ensure_ascii=False)
    )


def test_shown_files_hide_headers_and_user_info() -> None:
    foreign = FOREIGN_FULL.replace(b"https://", f"https://u:{SECRET}@".encode())
    text = render_hosts_toml(
        "ghcr.io", MIRROR, carried=carry_over(foreign), redact_secrets=True
    )

    assert SECRET not in text
    parsed = tomllib.loads(text)
    assert parsed["header"] == {"Authorization": "***", "X-Trace": "***"}
    assert parsed["server"] == "https://***@ghcr.example:8443/base"
    assert list(parsed["host"])[1] == "https://***@corp-mirror.example"


# Credentials never reach a message.


@pytest.mark.parametrize(
    "url",
    [f"http://user:{SECRET}@h", f"http://user:{SECRET}@h:99999",
     f"http://user:{SECRET}@h:x", f"http://user:{SECRET}@h/v2",
     f"ftp://user:{SECRET}@h", f"user:{SECRET}@h:5000", f"http://user:{SECRET}@[::1",
     f"http://user:{SECRET}#x@h", f"http://user:{SECRET}@a@h",
     f"http://user:{SECRET}@example\uff0fcom", f"http://{SECRET}@h"],
)  # fmt: skip
def test_mirror_url_errors_hide_the_password(url: str) -> None:
    with pytest.raises(HostsConfigError) as info:
        check_mirror_url(url)

    assert SECRET not in str(info.value)
    assert "***@" in str(info.value)


@pytest.mark.parametrize(
    "name",
    [f"user:{SECRET}@ghcr.io", f"https://user:{SECRET}@ghcr.io", f"{SECRET}@ghcr.io",
     f"user:{SECRET}@ghcr.io:5000", f"user@ghcr.io:{SECRET}@x"],
)  # fmt: skip
def test_registry_errors_hide_the_password(name: str) -> None:
    with pytest.raises(HostsConfigError) as info:
        check_registry(name)

    assert SECRET not in str(info.value)


@given(
    st.text(st.characters(blacklist_characters="@"), max_size=20),
    st.sampled_from(["http://u:", "https://", "", "u:", "http://u:p:"]),
    st.sampled_from(["@h", "@h:99999", "@h/v2", "@[::1", "@h?q", "@\uff0f"]),
)
def test_no_password_reaches_a_message(secret: str, head: str, tail: str) -> None:
    password = f"pw-{secret}"
    for check in (check_mirror_url, check_registry):
        try:
            check(head + password + tail)
        except HostsConfigError as exc:
            assert password not in str(exc)


def test_redact_keeps_urls_without_user_info() -> None:
    assert redact("http://h:5000/a") == "http://h:5000/a"
    assert redact("http://u:p@h:5000/a") == "http://***@h:5000/a"
    assert redact("u:p@h") == "***@h"


def test_cli_error_hides_the_password(tmp_path: Path) -> None:
    mirror = f"http://user:{SECRET}@127.0.0.1:5000"
    result = subprocess.run(
        [str(TCR_MIRROR), "containerd-config", "--certs-dir", str(tmp_path),
         "--mirror", mirror, "ghcr.io"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert "must not carry credentials" in result.stderr
    assert SECRET not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("mirror", "extra", "message"),
    [
        ("http://127.0.0.1:5000", ["--skip-verify"], "for https mirrors only"),
        ("http://127.0.0.1:0", [], "port 0"),
    ],
)
def test_a_mirror_containerd_cannot_use_as_given_is_refused(
    tmp_path: Path, mirror: str, extra: list[str], message: str
) -> None:
    result = subprocess.run(
        [str(TCR_MIRROR), "containerd-config", "--certs-dir", str(tmp_path),
         "--mirror", mirror, *extra, "ghcr.io"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip

    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())


# Where containerd looks (pure).


@pytest.mark.parametrize(
    ("registry", "names"),
    [
        ("ghcr.io", ("ghcr.io",)),
        ("_default", ("_default",)),
        ("a.com:5000", ("a.com_5000_", "a.com:5000")),
        ("[::1]:5000", ("[::1]_5000_", "[::1]:5000")),
        # containerd's own rule takes the last colon, even inside brackets.
        ("[2001:db8::1]", ("[2001:db8:_1]_", "[2001:db8::1]")),
    ],
)
def test_host_dir_names_follow_containerds_lookup(
    registry: str, names: tuple[str, ...]
) -> None:
    assert host_dir_names(registry) == names


# Decisions (pure).

OURS = render_hosts_toml("ghcr.io", MIRROR).encode()
OURS_OLD = render_hosts_toml("ghcr.io", "http://127.0.0.1:6000").encode()
FOREIGN = b'server = "https://ghcr.io"\n'
OTHER = b"# another hand-written file\n"


@pytest.mark.parametrize(
    ("current", "backup", "expected"),
    [
        (None, None, InstallStep.CREATE),
        (None, FOREIGN, InstallStep.CREATE),
        (OURS, None, InstallStep.UNCHANGED),
        (OURS, FOREIGN, InstallStep.UNCHANGED),
        (OURS_OLD, None, InstallStep.REPLACE_OURS),
        (OURS_OLD, FOREIGN, InstallStep.REPLACE_OURS),
        (FOREIGN, None, InstallStep.BACKUP_AND_REPLACE),
        # A run died after the backup was made.
        (FOREIGN, FOREIGN, InstallStep.FINISH_REPLACE),
    ],
)
def test_install_step(
    current: bytes | None, backup: bytes | None, expected: InstallStep
) -> None:
    assert install_step(current, backup, OURS) is expected


def test_install_refuses_to_lose_a_foreign_file_or_its_backup() -> None:
    with pytest.raises(HostsConfigError, match="move one of them away"):
        install_step(OTHER, FOREIGN, OURS)


@pytest.mark.parametrize(
    ("current", "backup", "expected"),
    [
        (None, None, UndoStep.NOTHING),
        (None, FOREIGN, UndoStep.RESTORE),
        (OURS, None, UndoStep.REMOVE),
        (OURS, FOREIGN, UndoStep.RESTORE),
        (FOREIGN, None, UndoStep.LEAVE_FOREIGN),
        (FOREIGN, FOREIGN, UndoStep.DROP_BACKUP),
        (OTHER, FOREIGN, UndoStep.LEAVE_FOREIGN),
    ],
)
def test_undo_step(
    current: bytes | None, backup: bytes | None, expected: UndoStep
) -> None:
    assert undo_step(current, backup) is expected


# Files.


def _run(certs: Path, *args: str) -> int:
    return main(["containerd-config", "--certs-dir", str(certs), *args])


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


Entry = tuple[int, int, int, bytes | str | None]


def _snapshot(root: Path) -> dict[str, Entry]:
    """Everything about a tree that containerd or a person could notice."""
    found: dict[str, Entry] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            content: bytes | str | None = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            content = path.read_bytes()
        else:
            content = None
        found[str(path.relative_to(root))] = (
            info.st_mode, info.st_uid, info.st_gid, content
        )  # fmt: skip
    return found


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)


def test_install_is_idempotent(tmp_path: Path) -> None:
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0
    hosts = tmp_path / "ghcr.io" / "hosts.toml"
    before = hosts.stat()

    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0

    after = hosts.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _tree(tmp_path) == {
        "_default/hosts.toml": render_hosts_toml(
            "_default", MIRROR, created_dir=True
        ).encode(),
        "ghcr.io/hosts.toml": render_hosts_toml(
            "ghcr.io", MIRROR, created_dir=True
        ).encode(),
    }
    assert oct(after.st_mode & 0o777) == "0o644"
    assert oct((tmp_path / "ghcr.io").stat().st_mode & 0o777) == "0o755"


def test_foreign_file_is_backed_up_once_and_restored_exactly(tmp_path: Path) -> None:
    original = b'server = "https://ghcr.io"\n# hand-written\n'
    _write(tmp_path / "ghcr.io" / "ca.crt", b"cert")
    _write(tmp_path / "ghcr.io" / "hosts.toml", original)

    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    _run(tmp_path, "--mirror", "http://127.0.0.1:6000", "ghcr.io")
    installed = _tree(tmp_path)
    assert _run(tmp_path, "--undo") == 0

    assert installed["ghcr.io/" + BACKUP_NAME] == original
    assert installed["ghcr.io/hosts.toml"].startswith(MARKER.encode())
    assert b"127.0.0.1:6000" in installed["ghcr.io/hosts.toml"]
    assert _tree(tmp_path) == {
        "ghcr.io/ca.crt": b"cert",
        "ghcr.io/hosts.toml": original,
    }


def test_foreign_file_after_backup_is_refused_and_nothing_changes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    (tmp_path / "ghcr.io" / "hosts.toml").write_text("# newer hand edit\n")
    before = _snapshot(tmp_path)
    capsys.readouterr()

    status = _run(tmp_path, "--mirror", MIRROR, "_default", "ghcr.io")

    assert status == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tcr-mirror: error:")
    assert BACKUP_NAME in line
    # Two registries were named: the message says which directory.
    assert str(tmp_path / "ghcr.io") in line
    assert _snapshot(tmp_path) == before


def test_undo_removes_ours_and_leaves_foreign_files(tmp_path: Path) -> None:
    _write(tmp_path / "quay.io" / "hosts.toml", FOREIGN)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default")

    assert _run(tmp_path, "--undo", "quay.io") == 0
    assert _run(tmp_path, "--undo") == 0

    assert _tree(tmp_path) == {"quay.io/hosts.toml": FOREIGN}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quay.io"]


def test_undo_keeps_a_directory_that_was_there_before(tmp_path: Path) -> None:
    # An empty directory is not nothing to containerd: it hides _default.
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "quay.io").mkdir()
    before = _snapshot(tmp_path)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "quay.io")
    _write(tmp_path / "quay.io" / "ca.crt", b"added by hand later")

    assert _run(tmp_path, "--undo") == 0

    after = _snapshot(tmp_path)
    assert after.pop("quay.io/ca.crt")[3] == b"added by hand later"
    assert after == before


def test_a_new_directory_carries_what_default_gave_the_registry(
    tmp_path: Path,
) -> None:
    # Read before any install, and again from the backup once _default is
    # ours; relative paths now go through the registry's own directory.
    _write(
        tmp_path / "_default" / "hosts.toml",
        b'ca = "corp.pem"\n[host."https://corp"]\n',
    )
    _write(tmp_path / "_default" / "node.cert", b"pem")
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0
    first = (tmp_path / "ghcr.io" / "hosts.toml").read_bytes()
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0

    parsed = tomllib.loads(first.decode())
    assert (tmp_path / "ghcr.io" / "hosts.toml").read_bytes() == first
    assert parsed["server"] == "https://ghcr.io"
    assert parsed["ca"] == "../_default/corp.pem"
    assert list(parsed["host"]) == [MIRROR, "https://corp"]


def test_dry_run_changes_nothing_and_shows_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = b'server = "https://ghcr.io"\n[header]\n  Authorization = "s3cr3t-pw"\n'
    _write(tmp_path / "ghcr.io" / "hosts.toml", foreign)

    _run(tmp_path, "--mirror", MIRROR, "--dry-run", "ghcr.io", "_default")
    out = capsys.readouterr().out

    assert _tree(tmp_path) == {"ghcr.io/hosts.toml": foreign}
    assert "dry run: back up and replace:" in out
    assert "dry run: create:" in out
    assert out.count(MARKER) == 2
    assert 'header = { "Authorization" = "***" }' in out
    assert SECRET not in out


def test_unwritable_certs_dir_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "not-a-dir"
    certs.write_text("")

    assert _run(certs, "--mirror", MIRROR, "ghcr.io") == 2

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tcr-mirror: error: cannot ")
    assert line.endswith("Not a directory")


# Modes and owners (the replaced file may hold credentials in its headers).


def test_a_private_file_stays_private_in_backup_ours_and_restored(
    tmp_path: Path,
) -> None:
    hosts = tmp_path / "ghcr.io" / "hosts.toml"
    _write(hosts, b'[header]\n  Authorization = "s3cr3t-pw"\n', 0o600)
    before = _snapshot(tmp_path)

    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    backup_mode = (tmp_path / "ghcr.io" / BACKUP_NAME).stat().st_mode
    ours_mode = hosts.stat().st_mode
    _run(tmp_path, "--undo")

    assert oct(backup_mode & 0o777) == "0o600"
    assert oct(ours_mode & 0o777) == "0o600"
    assert _snapshot(tmp_path) == before


def test_ours_is_never_more_open_than_what_it_replaces(tmp_path: Path) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN, 0o640)
    _write(tmp_path / "quay.io" / "hosts.toml", FOREIGN, 0o666)

    _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "quay.io")
    _run(tmp_path, "--mirror", "http://127.0.0.1:6000", "ghcr.io")

    modes = {
        name: (tmp_path / name / "hosts.toml").stat().st_mode & 0o777
        for name in ("ghcr.io", "quay.io")
    }
    assert modes == {"ghcr.io": 0o640, "quay.io": 0o644}


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
@pytest.mark.parametrize("link_works", [True, False])
def test_backup_keeps_mode_owner_and_times_and_ours_keeps_the_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, link_works: bool
) -> None:
    hosts = tmp_path / "ghcr.io" / "hosts.toml"
    _write(hosts, FOREIGN, 0o640)
    os.chown(hosts, 1234, 5678)
    os.utime(hosts, ns=(1_000_000_000, 2_000_000_000))
    before = _snapshot(tmp_path)
    if not link_works:
        # As on a file system without hard links.
        monkeypatch.setattr(os, "link", _raise(PermissionError(1, "no links")))

    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    backup = (tmp_path / "ghcr.io" / BACKUP_NAME).stat()
    ours = hosts.stat()
    _run(tmp_path, "--undo")

    assert (backup.st_mode & 0o777, backup.st_uid, backup.st_gid) == (0o640, 1234, 5678)
    assert backup.st_mtime_ns == 2_000_000_000
    assert (ours.st_mode & 0o777, ours.st_uid, ours.st_gid) == (0o640, 1234, 5678)
    assert _snapshot(tmp_path) == before
    assert hosts.stat().st_mtime_ns == 2_000_000_000


def test_a_symlinked_hosts_toml_comes_back_as_the_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "shared" / "ghcr.toml", FOREIGN)
    (tmp_path / "certs" / "ghcr.io").mkdir(parents=True)
    (tmp_path / "certs" / "ghcr.io" / "hosts.toml").symlink_to("../../shared/ghcr.toml")
    before = _snapshot(tmp_path)

    _run(tmp_path / "certs", "--mirror", MIRROR, "ghcr.io")
    installed = (tmp_path / "certs" / "ghcr.io" / "hosts.toml").read_bytes()
    _run(tmp_path / "certs", "--undo")

    assert is_ours(installed)
    assert _snapshot(tmp_path) == before


def test_a_dangling_hosts_toml_symlink_is_refused_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its target may be a mount not there yet; replacing it would lose it.
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "hosts.toml").symlink_to("/nonexistent/hosts.toml")
    before = _snapshot(tmp_path)

    status = _run(tmp_path, "--mirror", MIRROR, "ghcr.io")

    [line] = capsys.readouterr().err.splitlines()
    assert status == 2
    assert "symlink to nothing" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_a_hosts_toml_that_is_no_regular_file_is_refused_and_kept(
    tmp_path: Path, kind: str
) -> None:
    # Run as its own process: a read of a FIFO without a writer would hang
    # this test rather than fail it.
    hosts = tmp_path / "ghcr.io" / "hosts.toml"
    hosts.parent.mkdir()
    if kind == "fifo":
        os.mkfifo(hosts)
    else:
        hosts.mkdir()
    before = _snapshot(tmp_path)
    command = ["containerd-config", "--certs-dir", str(tmp_path)]
    command += ["--mirror", MIRROR, "ghcr.io"]

    result = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", *command],
        capture_output=True,
        text=True,
        timeout=60,
    )

    [line] = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert f"{hosts} is not a regular file" in line
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("foreign", UNREADABLE)
def test_an_unreadable_foreign_file_is_a_one_line_error_and_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], foreign: bytes
) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", foreign)
    _write(tmp_path / "ghcr.io" / "ca.crt", b"")
    before = _snapshot(tmp_path)

    status = _run(tmp_path, "--mirror", MIRROR, "_default", "ghcr.io")

    [line] = capsys.readouterr().err.splitlines()
    assert status == 2
    assert line.startswith(f"tcr-mirror: error: {tmp_path / 'ghcr.io/hosts.toml'} is")
    assert SECRET not in line
    assert _snapshot(tmp_path) == before


def test_two_registries_sharing_a_directory_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Each would plan from the foreign file; the second would then fail to
    # back it up again, and later runs would rewrite the file for ever.
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN)
    (tmp_path / "reg.local_5000_").symlink_to("ghcr.io")
    before = _snapshot(tmp_path)

    status = _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "reg.local:5000")

    assert status == 2
    assert _snapshot(tmp_path) == before
    [line] = capsys.readouterr().err.splitlines()
    assert "reg.local:5000 and ghcr.io share the directory" in line


def _raise(error: BaseException) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    return fail


# The directory containerd reads: host_port_ before host:port.


def test_an_existing_host_port_directory_gets_our_file(tmp_path: Path) -> None:
    _write(tmp_path / "reg.local_5000_" / "hosts.toml", FOREIGN)
    before = _snapshot(tmp_path)

    assert _run(tmp_path, "--mirror", MIRROR, "reg.local:5000") == 0

    assert sorted(_tree(tmp_path)) == [
        "reg.local_5000_/hosts.toml",
        f"reg.local_5000_/{BACKUP_NAME}",
    ]
    assert is_ours((tmp_path / "reg.local_5000_" / "hosts.toml").read_bytes())
    assert _run(tmp_path, "--undo", "reg.local:5000") == 0
    assert _snapshot(tmp_path) == before


def test_ours_leaves_a_directory_containerd_stopped_reading(tmp_path: Path) -> None:
    _run(tmp_path, "--mirror", MIRROR, "reg.local:5000")
    (tmp_path / "reg.local_5000_").mkdir()

    assert _run(tmp_path, "--mirror", MIRROR, "reg.local:5000") == 0

    assert sorted(p.name for p in tmp_path.iterdir()) == ["reg.local_5000_"]
    assert is_ours((tmp_path / "reg.local_5000_" / "hosts.toml").read_bytes())
    assert _run(tmp_path, "--undo") == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["reg.local_5000_"]


def test_undo_of_a_registry_covers_both_spellings(tmp_path: Path) -> None:
    _write(tmp_path / "reg.local:5000" / "hosts.toml", OURS)
    _write(tmp_path / "reg.local_5000_" / "hosts.toml", OURS)

    assert _run(tmp_path, "--undo", "reg.local:5000") == 0

    assert _tree(tmp_path) == {}


def test_both_spellings_as_one_directory_are_not_undone(tmp_path: Path) -> None:
    _write(tmp_path / "reg.local:5000" / "hosts.toml", FOREIGN)
    (tmp_path / "reg.local_5000_").symlink_to("reg.local:5000")

    _run(tmp_path, "--mirror", MIRROR, "reg.local:5000")
    status = _run(tmp_path, "--mirror", MIRROR, "reg.local:5000")

    assert status == 0
    assert is_ours((tmp_path / "reg.local:5000" / "hosts.toml").read_bytes())


def test_a_host_port_file_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write(tmp_path / "reg.local_5000_", b"")

    assert _run(tmp_path, "--mirror", MIRROR, "reg.local:5000") == 2

    [line] = capsys.readouterr().err.splitlines()
    assert "reg.local_5000_ is not a directory" in line


# The replaced configuration, on disk.


def test_cert_files_and_foreign_settings_reach_our_file(tmp_path: Path) -> None:
    for name in ("ca.crt", "node.cert", "node.key"):
        _write(tmp_path / "quay.io" / name, b"pem")
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN_FULL)

    _run(tmp_path, "--mirror", MIRROR, "quay.io", "ghcr.io")

    quay = tomllib.loads((tmp_path / "quay.io" / "hosts.toml").read_text())
    ghcr = tomllib.loads((tmp_path / "ghcr.io" / "hosts.toml").read_text())
    assert quay == {
        "server": "https://quay.io",
        "ca": ["ca.crt"],
        "client": [["node.cert", "node.key"]],
        "host": {MIRROR: PULL_ONLY},
    }
    assert ghcr["server"] == "https://ghcr.example:8443/base"
    assert ghcr["header"]["Authorization"] == f"Bearer {SECRET}"
    assert ghcr["host"][MIRROR] == PULL_ONLY


def test_a_new_mirror_still_carries_the_original_settings(tmp_path: Path) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN_FULL)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")

    _run(tmp_path, "--mirror", "http://127.0.0.1:6000", "ghcr.io")

    parsed = tomllib.loads((tmp_path / "ghcr.io" / "hosts.toml").read_text())
    assert parsed["ca"] == "ca.pem"
    assert list(parsed["host"])[0] == "http://127.0.0.1:6000"


# Crashes: a run may die at any step; the next one (either way) converges.


def test_a_crash_after_the_backup_is_finished_by_the_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN, 0o600)
    original = _snapshot(tmp_path)
    real_replace = os.replace

    def replace(source: str, target: str | Path) -> None:
        if Path(target).name == "hosts.toml":
            raise OSError(5, "Input/output error")
        real_replace(source, target)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace)
        assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io") == 2
    assert (tmp_path / "ghcr.io" / BACKUP_NAME).read_bytes() == FOREIGN

    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io") == 0
    assert is_ours((tmp_path / "ghcr.io" / "hosts.toml").read_bytes())
    assert _run(tmp_path, "--undo") == 0
    assert _snapshot(tmp_path) == original


def test_undo_after_a_crash_after_the_backup_drops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN)
    original = _snapshot(tmp_path)
    monkeypatch.setattr(os, "replace", _raise(OSError(5, "Input/output error")))
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io") == 2
    monkeypatch.undo()

    assert _run(tmp_path, "--undo") == 0

    assert _snapshot(tmp_path) == original


def test_a_crash_in_undo_is_finished_by_the_next_undo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(tmp_path / "ghcr.io" / "hosts.toml", FOREIGN, 0o600)
    original = _snapshot(tmp_path)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    real_unlink = os.unlink

    def unlink(path: str | Path, **kwargs: Any) -> None:
        if Path(path).name == BACKUP_NAME:
            raise OSError(5, "Input/output error")
        real_unlink(path, **kwargs)

    with monkeypatch.context() as patch:
        # Wherever undo would be between restoring and dropping the backup.
        patch.setattr(os, "unlink", unlink)
        _run(tmp_path, "--undo")

    assert _run(tmp_path, "--undo") == 0
    assert _snapshot(tmp_path) == original
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io") == 0


# The killed runs: a copy of the command in a subprocess that os._exit()s
# just before its n-th call to any of these, so nothing is cleaned up.
_KILLABLE = """
import argparse, os, sys
from tcr_mirror import containerd

crash_at, calls = int(sys.argv[1]), 0

def killable(real):
    def call(*args, **kwargs):
        global calls
        if calls == crash_at:
            os._exit(137)
        calls += 1
        return real(*args, **kwargs)
    return call

parser = argparse.ArgumentParser()
containerd.register(parser.add_subparsers())
args = parser.parse_args(sys.argv[2:])
for name in ("link", "rename", "replace", "unlink", "rmdir", "mkdir", "fsync"):
    setattr(os, name, killable(getattr(os, name)))
status = args.func(args)
print(f"calls={calls}", file=sys.stderr)
sys.exit(status)
"""
_NEVER = 10**9


def _killed_run(
    certs: Path, crash_at: int, *args: str
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _KILLABLE, str(crash_at)]
    command += ["containerd-config", "--certs-dir", str(certs), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _steps(certs: Path, *args: str) -> int:
    result = _killed_run(certs, _NEVER, *args)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.rpartition("calls=")[2])


def _foreign_ours_and_none(certs: Path) -> None:
    _foreign(certs)
    _write(certs / "ours.io" / "hosts.toml", OURS_OLD)


def _foreign(certs: Path) -> None:
    _write(certs / "ghcr.io" / "hosts.toml", b'[header]\n  A = "s3cr3t-pw"\n', 0o600)
    _write(certs / "ghcr.io" / "node.cert", b"pem")
    (certs / "ours.io").mkdir()


def _default_only(certs: Path) -> None:
    _write(certs / "_default" / "hosts.toml", b'[host."https://corp"]\n', 0o640)
    _write(certs / "_default" / "ca.crt", b"pem")


def _host_port_appeared(certs: Path) -> None:
    assert _run(certs, "--mirror", MIRROR, "reg.local:5000") == 0
    _host_port_only(certs)


def _host_port_only(certs: Path) -> None:
    _write(certs / "reg.local_5000_" / "hosts.toml", FOREIGN, 0o640)


Setup = Callable[[Path], None]
# name: (the state before, the state undo must give back, the registries)
_SCENARIOS: dict[str, tuple[Setup, Setup, list[str]]] = {
    "foreign, ours and none": (
        _foreign_ours_and_none, _foreign, ["ghcr.io", "_default", "ours.io"]
    ),
    "host_port_ appeared": (_host_port_appeared, _host_port_only, ["reg.local:5000"]),
    "_default only": (_default_only, _default_only, ["reg.local:5000", "_default"]),
}  # fmt: skip


def _expectations(
    tmp_path: Path, scenario: str
) -> tuple[list[str], dict[str, Entry], dict[str, Entry]]:
    """The install arguments, and the trees a clean install and undo give."""
    before, original, registries = _SCENARIOS[scenario]
    install = ["--mirror", MIRROR, *registries]
    certs = _fresh(tmp_path / "clean", before)
    assert _run(certs, *install) == 0
    installed = _snapshot(certs)
    assert _run(certs, "--undo") == 0
    assert _snapshot(certs) == _snapshot(_fresh(tmp_path / "original", original))
    return install, installed, _snapshot(certs)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_an_install_killed_at_any_step_converges(tmp_path: Path, scenario: str) -> None:
    before = _SCENARIOS[scenario][0]
    install, installed, original = _expectations(tmp_path, scenario)
    steps = _steps(_fresh(tmp_path / "count", before), *install)

    assert steps >= 8
    for crash_at in range(steps):
        for follow_up, want in ((install, installed), (["--undo"], original)):
            certs = _fresh(tmp_path / f"{crash_at}{follow_up[0]}", before)
            killed = _killed_run(certs, crash_at, *install)
            assert killed.returncode == 137, killed.stderr
            assert _run(certs, *follow_up) == 0
            assert _snapshot(certs) == want, f"killed before step {crash_at}"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_an_undo_killed_at_any_step_converges(tmp_path: Path, scenario: str) -> None:
    before = _SCENARIOS[scenario][0]
    install, installed, original = _expectations(tmp_path, scenario)
    steps = _steps(_installed(tmp_path / "count", before, install), "--undo")

    assert steps >= 2
    for crash_at in range(steps):
        for follow_up, want in ((["--undo"], original), (install, installed)):
            certs = _installed(tmp_path / f"{crash_at}{follow_up[0]}", before, install)
            killed = _killed_run(certs, crash_at, "--undo")
            assert killed.returncode == 137, killed.stderr
            assert _run(certs, *follow_up) == 0
            assert _snapshot(certs) == want, f"killed before step {crash_at}"


def _fresh(certs: Path, setup: Setup) -> Path:
    certs.mkdir()
    setup(certs)
    return certs


def _installed(certs: Path, setup: Setup, install: list[str]) -> Path:
    _fresh(certs, setup)
    assert _run(certs, *install) == 0
    return certs


# The installed command.


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mirror", MIRROR, "a/b"], "is not host[:port]"),
        (["--mirror", "http://127.0.0.1:5000/x", "ghcr.io"], "no path"),
        (["ghcr.io"], "--mirror URL is required"),
        (["--mirror", MIRROR], "name at least one REGISTRY"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = subprocess.run(
        [str(TCR_MIRROR), "containerd-config", "--certs-dir", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("tcr-mirror: error:")
    assert message in line
    assert list(tmp_path.iterdir()) == []


# containerd reads what we wrote.


def _configure(certs: Path, mirror: str, *registries: str) -> None:
    result = subprocess.run(
        [str(TCR_MIRROR), "containerd-config", "--certs-dir", str(certs),
         "--mirror", mirror, *registries],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.root
def test_containerd_pulls_through_the_configured_mirror(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    # The "mirror" here is the registry itself, which proves the file alone;
    # tests/test_proxy_clients.py pulls through the real node mirror.
    image = push_image(registry, "lib/app", "v1", layer_sizes=[1500])
    certs = tmp_path / "certs.d"
    _configure(certs, registry.url, registry.host)

    result = containerd.pull(f"{registry.host}/lib/app:v1", certs)

    assert result.returncode == 0, result.stderr
    assert containerd.images()[f"{registry.host}/lib/app:v1"] == image.manifest_digest
    digest, _ = image.layers[0]
    assert registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 1


@pytest.mark.root
@pytest.mark.parametrize("namespace", ["registry", "_default", "host_port_"])
def test_containerd_sends_ns_to_a_separate_mirror(
    registry: Registry,
    registry_factory: Callable[..., Registry],
    containerd: Containerd,
    tmp_path: Path,
    namespace: str,
) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[1500])
    mirror = registry_factory(proxy_remote=registry.url)
    certs = tmp_path / "certs.d"
    if namespace == "host_port_":
        # containerd reads 127.0.0.1_<port>_ first, empty or not.
        (certs / (registry.host.replace(":", "_") + "_")).mkdir(parents=True)
    _configure(
        certs, mirror.url, "_default" if namespace == "_default" else registry.host
    )

    result = containerd.pull(f"{registry.host}/lib/app:v1", certs)

    assert result.returncode == 0, result.stderr
    digest, _ = image.layers[0]
    [get] = mirror.requests_for("GET", f"/v2/lib/app/blobs/{digest}")
    assert get.user_agent.startswith(CONTAINERD_USER_AGENT_PREFIX)
    assert get.params == {"ns": [registry.host]}
    assert registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 0


@pytest.mark.root
def test_containerd_falls_back_to_the_registry_when_the_mirror_is_down(
    registry: Registry, containerd: Containerd, tmp_path: Path
) -> None:
    image = push_image(registry, "lib/app", "v1", layer_sizes=[1500])
    certs = tmp_path / "certs.d"
    _configure(certs, f"http://127.0.0.1:{free_port()}", registry.host)

    result = containerd.pull(f"{registry.host}/lib/app:v1", certs)

    assert result.returncode == 0, result.stderr
    digest, _ = image.layers[0]
    assert registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 1


@pytest.mark.root
@pytest.mark.parametrize("mirror_up", [True, False])
def test_containerd_1_x_tries_a_carried_inline_host_after_the_mirror(
    registry: Registry,
    registry_factory: Callable[..., Registry],
    containerd: Containerd,
    tmp_path: Path,
    mirror_up: bool,
) -> None:
    # Debian's containerd 1.6 reads an inline host entry, and before any
    # [host."URL"] table; in our file it comes after the mirror.
    image = push_image(registry, "lib/app", "v1", layer_sizes=[1500])
    corp = registry_factory(proxy_remote=registry.url)
    ours = registry_factory(proxy_remote=registry.url) if mirror_up else None
    certs = tmp_path / "certs.d"
    _write(
        certs / registry.host / "hosts.toml",
        f'server = "{registry.url}"\n'
        f'host."{corp.url}" = {{ capabilities = ["pull", "resolve"] }}\n'.encode(),
    )
    _configure(
        certs, ours.url if ours else f"http://127.0.0.1:{free_port()}", registry.host
    )

    result = containerd.pull(f"{registry.host}/lib/app:v1", certs)

    assert result.returncode == 0, result.stderr
    digest, _ = image.layers[0]
    blob = f"/v2/lib/app/blobs/{digest}"
    served = [len(m.requests_for("GET", blob)) for m in (ours, corp) if m]
    assert served == ([1, 0] if mirror_up else [1])
    assert registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 0


def _write_private_ca_hosts(
    host_dir: Path, registry: Registry, tls_files: TlsFiles, extra: str = ""
) -> None:
    """A hosts.toml whose server, and its host entry, trust a private CA
    kept beside it; ``extra`` goes between the two."""
    _write(host_dir / "private-ca.pem", tls_files.ca.read_bytes())
    _write(
        host_dir / "hosts.toml",
        f'server = "{registry.url}"\nca = "private-ca.pem"\n{extra}'
        f'[host."{registry.url}"]\n  ca = "private-ca.pem"\n'.encode(),
    )


@pytest.mark.root
def test_the_fallback_keeps_the_replaced_server_and_its_ca(
    tls_registry: Registry, tls_files: TlsFiles, containerd: Containerd, tmp_path: Path
) -> None:
    # The name does not resolve: only the carried server reaches the
    # registry, and only with the carried CA does its certificate verify.
    name = "images.example:5000"
    image = push_image(tls_registry, "lib/app", "v1", layer_sizes=[1500])
    _write_private_ca_hosts(
        tmp_path / "certs.d" / name,
        tls_registry,
        tls_files,
        '[header]\n  X-Team = "a"\n',
    )
    _configure(tmp_path / "certs.d", f"http://127.0.0.1:{free_port()}", name)

    result = containerd.pull(
        f"{name}/lib/app:v1", tmp_path / "certs.d", plain_http=False
    )

    assert result.returncode == 0, result.stderr
    digest, _ = image.layers[0]
    assert tls_registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 1


def test_rendering_imports_no_async_or_network_layer() -> None:
    code = (
        "import sys, tcr_mirror.containerd; "
        "print(sorted(m for m in ('trio', 'httpx', 'socket') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )

    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.root
def test_a_registry_s_new_directory_keeps_what_default_gave_it(
    tls_registry: Registry, tls_files: TlsFiles, containerd: Containerd, tmp_path: Path
) -> None:
    # Without a directory of its own the registry was reached through
    # _default's server and CA; the directory we create hides _default.
    name = "images.example:5000"
    image = push_image(tls_registry, "lib/app", "v1", layer_sizes=[1500])
    certs = tmp_path / "certs.d"
    _write_private_ca_hosts(certs / "_default", tls_registry, tls_files)
    before = containerd.pull(f"{name}/lib/app:v1", certs, plain_http=False)
    assert before.returncode == 0, before.stderr
    _configure(certs, f"http://127.0.0.1:{free_port()}", name)

    result = containerd.pull(f"{name}/lib/app:v1", certs, plain_http=False)

    assert result.returncode == 0, result.stderr
    assert (certs / "_default" / "hosts.toml").read_bytes().startswith(b"server")
    digest, _ = image.layers[0]
    assert tls_registry.blob_gets("lib/app", digest, CONTAINERD_USER_AGENT_PREFIX) == 1
