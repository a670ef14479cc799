"""The node's configuration: TOML, flags over it, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tcr_mirror.proxy._config import ConfigError, NodeConfig, parse_size
from tcr_mirror.proxy.cli import _config_from_args, build_node_parser


def config_from(argv: list[str]) -> NodeConfig:
    return _config_from_args(build_node_parser().parse_args(argv))


def test_toml_then_flags(tmp_path: Path) -> None:
    credentials = tmp_path / "tcr.credentials"
    credentials.write_text("100012345678:token-value\n")
    toml = tmp_path / "node.toml"
    toml.write_text(
        f"""
        listen = "127.0.0.1:6000"
        data_dir = "{tmp_path / "data"}"
        tag_ttl = 2
        max_store_bytes = "2GiB"
        ca_file = "/etc/tcr-mirror/ca.pem"
        [[upstreams]]
        url = "https://example.tencentcloudcr.com"
        default = true
        credentials_file = "{credentials}"
        [[upstreams]]
        namespace = "docker.io"
        url = "https://mirror.example/"
        """
    )
    config = config_from(["--config", str(toml), "--listen", "127.0.0.1:7000"])
    assert config.listen == ("127.0.0.1", 7000)
    assert config.tag_ttl == 2
    assert config.max_store_bytes == 2 << 30
    assert config.ca_file == Path("/etc/tcr-mirror/ca.pem")
    default = config.default_upstream
    assert default is not None
    assert default.namespace == "example.tencentcloudcr.com"
    assert default.credentials is not None
    assert default.credentials.password == "token-value"
    assert "token-value" not in repr(config)
    assert [up.url for up in config.upstreams][1] == "https://mirror.example"


def test_upstream_and_credentials_flags(tmp_path: Path) -> None:
    secret = tmp_path / "cred"
    secret.write_text("u:p\n")
    config = config_from(
        ["--upstream", "http://127.0.0.1:5001", "--upstream", "hub=http://h:1",
         "--credentials-file", f"hub={secret}", "--credentials-file", str(secret)]
    )  # fmt: skip
    by_name = {up.namespace: up for up in config.upstreams}
    assert by_name["127.0.0.1:5001"].default
    assert not by_name["hub"].default
    assert by_name["hub"].credentials is not None
    assert by_name["127.0.0.1:5001"].credentials is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no upstream"),
        (["--upstream", "ftp://x"], "http(s)"),
        (["--upstream", "http://u:p@x"], "credentials file"),
        (["--upstream", "http://a", "--upstream", "http://b"], "more than one default"),
        (["--upstream", "a=http://x", "--upstream", "a=http://y"], "given twice"),
        (["--upstream", "http://x", "--listen", "nope"], "HOST:PORT"),
        (["--upstream", "http://x", "--max-store-bytes", "lots"], "size"),
        (["--upstream", "http://x", "--store-watermarks", "0.5,0.9"], "watermarks"),
        (["--upstream", "http://x", "--credentials-file", "nobody=/x"], "names no"),
        (
            ["--upstream", "http://x", "--credentials-file", "/nonexistent"],
            "cannot read",
        ),
        (["--upstream", "http://x", "--credentials-url", "http://c"], "node secret"),
        (["--config", "/nonexistent.toml"], "cannot read config"),
    ],
)
def test_bad_configuration(argv: list[str], message: str) -> None:
    with pytest.raises(
        ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        config_from(argv)


def test_bad_toml(tmp_path: Path) -> None:
    for text, message in (
        ("listen = ", "not valid TOML"),
        ("colour = 'blue'", "unknown config key"),
        ("upstreams = 5", "array of tables"),
        ("[[upstreams]]\nurl = 'http://x'\nuser = 'a'", "unknown upstream key"),
        ("tag_ttl = -1", "non-negative"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            NodeConfig.from_toml(path)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("50GiB", 50 << 30),
        ("1.5g", 1_500_000_000),
        ("512 MiB", 512 << 20),
        (4096, 4096),
    ],
)
def test_sizes(text: str | int, size: int) -> None:
    assert parse_size(text) == size


def test_cli_errors_are_one_line_with_nonzero_exit(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node", "--upstream", "ftp://nope",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("tcr-mirror: error: upstream URL must be")
    assert "Traceback" not in result.stderr


def test_help_explains_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node", "--help"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    options = "--listen --data-dir --upstream --credentials-file --metrics-listen"
    options += " --max-store-bytes --credentials-url --proxy --no-proxy"
    for option in options.split():
        assert option in result.stdout
