"""``tcr-mirror containerd-config``: rendering, decisions, files, and containerd.

Rendering and the install/undo decisions are pure and tested without files;
the file handling runs on real files in tmp dirs; the CLI's error cases run
the installed ``tcr-mirror`` command; and the last tests let a real
containerd pull through the hosts.toml files the command wrote.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from support.containerd import CONTAINERD_USER_AGENT_PREFIX, Containerd
from support.images import push_image
from support.registry import Registry, free_port
from tcr_mirror.cli import main
from tcr_mirror.containerd_config import (
    BACKUP_NAME,
    MARKER,
    HostsConfigError,
    InstallStep,
    UndoStep,
    check_mirror_url,
    check_registry,
    install_step,
    render_hosts_toml,
    undo_step,
)

MIRROR = "http://127.0.0.1:5000"
TCR_MIRROR = Path(sys.executable).with_name("tcr-mirror")

# Rendering (pure).


def _parsed(registry: str, mirror: str = MIRROR, **options: bool) -> dict[str, object]:
    return tomllib.loads(render_hosts_toml(registry, mirror, **options))


def test_named_registry_falls_back_to_itself_over_https() -> None:
    text = render_hosts_toml("ccr.ccs.tencentyun.com", MIRROR)

    assert text.startswith(MARKER + "\n")
    assert tomllib.loads(text) == {
        "server": "https://ccr.ccs.tencentyun.com",
        "host": {MIRROR: {"capabilities": ["pull", "resolve"]}},
    }


def test_docker_hub_falls_back_to_its_api_host() -> None:
    assert _parsed("docker.io")["server"] == "https://registry-1.docker.io"


@pytest.mark.parametrize(
    "registry", ["_default", "127.0.0.1:5001", "localhost:5000", "[::1]:5000"]
)
def test_default_and_loopback_leave_server_to_containerd(registry: str) -> None:
    parsed = _parsed(registry)

    assert "server" not in parsed
    assert parsed["host"] == {MIRROR: {"capabilities": ["pull", "resolve"]}}


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
     "a.com/../x"],
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
    assert tomllib.loads(text)["host"] == {
        MIRROR: {"capabilities": ["pull", "resolve"]}
    }
    assert "/" not in name
    assert name not in ("", ".", "..")


# Decisions (pure).

OURS = render_hosts_toml("ghcr.io", MIRROR)
OURS_OLD = render_hosts_toml("ghcr.io", "http://127.0.0.1:6000")
FOREIGN = 'server = "https://ghcr.io"\n'


@pytest.mark.parametrize(
    ("current", "has_backup", "expected"),
    [
        (None, False, InstallStep.CREATE),
        (None, True, InstallStep.CREATE),
        (OURS, False, InstallStep.UNCHANGED),
        (OURS, True, InstallStep.UNCHANGED),
        (OURS_OLD, False, InstallStep.REPLACE_OURS),
        (OURS_OLD, True, InstallStep.REPLACE_OURS),
        (FOREIGN, False, InstallStep.BACKUP_AND_REPLACE),
    ],
)
def test_install_step(
    current: str | None, has_backup: bool, expected: InstallStep
) -> None:
    assert install_step(current, has_backup, OURS) is expected


def test_install_refuses_to_lose_a_foreign_file_or_its_backup() -> None:
    with pytest.raises(HostsConfigError, match="move one of them away"):
        install_step(FOREIGN, True, OURS)


@pytest.mark.parametrize(
    ("current", "has_backup", "expected"),
    [
        (None, False, UndoStep.NOTHING),
        (None, True, UndoStep.RESTORE),
        (OURS, False, UndoStep.REMOVE),
        (OURS, True, UndoStep.RESTORE),
        (FOREIGN, False, UndoStep.LEAVE_FOREIGN),
        (FOREIGN, True, UndoStep.LEAVE_FOREIGN),
    ],
)
def test_undo_step(current: str | None, has_backup: bool, expected: UndoStep) -> None:
    assert undo_step(current, has_backup) is expected


# Files.


def _run(certs: Path, *args: str) -> int:
    return main(["containerd-config", "--certs-dir", str(certs), *args])


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_install_is_idempotent(tmp_path: Path) -> None:
    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0
    hosts = tmp_path / "ghcr.io" / "hosts.toml"
    before = hosts.stat()

    assert _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default") == 0

    after = hosts.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _tree(tmp_path) == {
        "_default/hosts.toml": render_hosts_toml("_default", MIRROR).encode(),
        "ghcr.io/hosts.toml": render_hosts_toml("ghcr.io", MIRROR).encode(),
    }
    assert oct(after.st_mode & 0o777) == "0o644"


def test_foreign_file_is_backed_up_once_and_restored_exactly(tmp_path: Path) -> None:
    original = b'server = "https://ghcr.io"\n# hand-written\n'
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "ca.crt").write_bytes(b"cert")
    (tmp_path / "ghcr.io" / "hosts.toml").write_bytes(original)

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
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "hosts.toml").write_text(FOREIGN)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io")
    (tmp_path / "ghcr.io" / "hosts.toml").write_text("# newer hand edit\n")
    before = _tree(tmp_path)
    capsys.readouterr()

    status = _run(tmp_path, "--mirror", MIRROR, "ghcr.io")

    assert status == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tcr-mirror: error:")
    assert BACKUP_NAME in line
    assert _tree(tmp_path) == before


def test_undo_removes_ours_and_leaves_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "quay.io").mkdir()
    (tmp_path / "quay.io" / "hosts.toml").write_text(FOREIGN)
    _run(tmp_path, "--mirror", MIRROR, "ghcr.io", "_default")

    assert _run(tmp_path, "--undo", "quay.io") == 0
    assert _run(tmp_path, "--undo") == 0

    assert _tree(tmp_path) == {"quay.io/hosts.toml": FOREIGN.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["quay.io"]


def test_dry_run_changes_nothing_and_shows_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ghcr.io").mkdir()
    (tmp_path / "ghcr.io" / "hosts.toml").write_text(FOREIGN)

    _run(tmp_path, "--mirror", MIRROR, "--dry-run", "ghcr.io", "_default")
    out = capsys.readouterr().out

    assert _tree(tmp_path) == {"ghcr.io/hosts.toml": FOREIGN.encode()}
    assert "dry run: back up and replace:" in out
    assert "dry run: create:" in out
    assert out.count(MARKER) == 2


def test_unwritable_certs_dir_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    certs = tmp_path / "not-a-dir"
    certs.write_text("")

    assert _run(certs, "--mirror", MIRROR, "ghcr.io") == 2

    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("tcr-mirror: error: cannot ")
    assert line.endswith("Not a directory")


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
@pytest.mark.parametrize("namespace", ["registry", "_default"])
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
    _configure(
        certs, mirror.url, registry.host if namespace == "registry" else namespace
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


def test_rendering_imports_no_async_or_network_layer() -> None:
    code = (
        "import sys, tcr_mirror.containerd_config; "
        "print(sorted(m for m in ('trio', 'httpx', 'socket') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )

    assert result.stdout.strip() == "[]", result.stderr
