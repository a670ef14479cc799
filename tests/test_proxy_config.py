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
        (["--upstream", "https://h:99999"], "upstream URL must be http"),
        (["--upstream", "http://h:abc"], "upstream URL must be http"),
        (["--upstream", "https://:443"], "upstream URL must be http"),
        (["--upstream", "http://[::1"], "upstream URL must be http"),
        (["--upstream", "http://exa mple"], "upstream URL must be http"),
        (["--upstream", "http://reg\u00edstry"], "upstream URL must be http"),
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
        ("tag_ttl = 'soon'", "tag_ttl must be a number of seconds"),
    ):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            NodeConfig.from_toml(path)


UPSTREAM = '[[upstreams]]\nurl = "http://127.0.0.1:5001"\n'


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('log_level = "loud"', "log_level must be one of debug, info, warning, error"),
        ("log_level = 3", "log_level must be a non-empty string"),
        ("max_store_bytes = inf", "max_store_bytes must be a size"),
        ("max_store_bytes = nan", "max_store_bytes must be a size"),
        ('max_store_bytes = "inf"', "max_store_bytes must be a size"),
        ('max_store_bytes = "nan GiB"', "max_store_bytes must be a size"),
        ('max_store_bytes = "1e400"', "max_store_bytes must be a size"),
        ("tag_ttl = nan", r"tag_ttl \(--tag-ttl\) must be a finite number"),
        ("tag_ttl = -1", r"tag_ttl \(--tag-ttl\) must be .* 0 or more, got -1"),
        ("connect_timeout = inf", "connect_timeout .* must be a finite number"),
        ("connect_timeout = 0", "connect_timeout .* more than 0, got 0"),
        ("read_timeout = -inf", "read_timeout .* must be a finite number"),
        ("read_timeout = -2.5", "read_timeout .* got -2.5"),
        ("credentials_refresh = nan", "credentials_refresh .* finite number"),
        ("drain_timeout = -1", "drain_timeout .* finite number"),
        ("drain_timeout = true", "drain_timeout must be a number of seconds"),
        ("store_high_watermark = nan", "watermarks must satisfy"),
        (UPSTREAM + 'default = "false"', "default must be true or false, got 'false'"),
        (UPSTREAM + "default = 1", "default must be true or false, got 1"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "node.toml"
    # Each document has an upstream, so only the value under test is wrong.
    path.write_text(toml if "[[upstreams]]" in toml else f"{toml}\n{UPSTREAM}")
    with pytest.raises(ConfigError, match=message) as raised:
        config_from(["--config", str(path)])
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tag-ttl", "nan"], r"tag_ttl \(--tag-ttl\) must be a finite number"),
        (["--read-timeout", "inf"], r"\(--read-timeout\) must be a finite number"),
        (["--connect-timeout", "-1"], r"\(--connect-timeout\) must be a finite"),
        (["--credentials-refresh", "0"], r"\(--credentials-refresh\) .* more than 0"),
        (["--drain-timeout", "nan"], r"\(--drain-timeout\) must be a finite number"),
        (["--max-store-bytes", "inf"], "--max-store-bytes must be a size"),
        (["--max-store-bytes", "1e400GiB"], "--max-store-bytes must be a size"),
        # Beyond what the socket and ssl modules' timeouts can hold.
        (["--connect-timeout", "1e10"], r"\(--connect-timeout\) must be at most"),
        (["--read-timeout", "86401"], r"\(--read-timeout\) must be at most 86400"),
        (["--listen", "127.0.0.1:\u00b2"], "expected HOST:PORT"),
        (["--listen", "127.0.0.1:65536"], "expected HOST:PORT"),
        # getaddrinfo's IDNA step raised a UnicodeError: a traceback.
        (["--listen", "\u00e9..:5000"], "expected HOST:PORT"),
        (["--metrics-listen", "h\u00f6st..x:9500"], "expected HOST:PORT"),
    ],
)
def test_bad_flag_values_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from(["--upstream", "http://127.0.0.1:5001", *flags])


@pytest.mark.parametrize(
    "flags",
    [
        ["--upstream", "https://user:pw-s3cret@registry.example:bad"],
        ["--credentials-url", "http://node:pw-s3cret@control:99999"],
    ],
)
def test_a_bad_url_is_refused_without_its_password(
    tmp_path: Path, flags: list[str]
) -> None:
    secret = tmp_path / "node-secret"
    secret.write_text("node secret\n")
    with pytest.raises(ConfigError) as raised:
        config_from(
            ["--upstream", "http://127.0.0.1:5001", *flags,
             "--node-secret-file", str(secret)]
        )  # fmt: skip
    assert "must be http(s)://host[:port]" in str(raised.value)
    assert "pw-s3cret" not in str(raised.value)


def test_an_upstream_without_default_is_not_the_default(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f"{UPSTREAM}default = false\n")
    assert config_from(["--config", str(path)]).default_upstream is None


def test_rules_spanning_file_and_flags_are_checked_once_merged(
    tmp_path: Path,
) -> None:
    # The file's upstream takes credentials from the control plane, whose
    # secret is a flag; the file's no_proxy goes with the --proxy flag.
    secret = tmp_path / "node.secret"
    secret.write_text("shared-secret\n")
    path = tmp_path / "node.toml"
    path.write_text(
        'no_proxy = ["internal.example"]\n'
        f'{UPSTREAM}default = true\ncredentials_url = "http://127.0.0.1:8700"\n'
    )
    config = config_from(
        ["--config", str(path), "--node-secret-file", str(secret),
         "--proxy", "http://proxy.internal:3128"]
    )  # fmt: skip
    assert config.node_secret == "shared-secret"
    default = config.default_upstream
    assert default is not None
    assert default.credentials_url == "http://127.0.0.1:8700"
    assert config.no_proxy == ("internal.example",)
    # Without the flags the same file is refused, once merged.
    with pytest.raises(ConfigError, match="credentials_url needs a node secret"):
        config_from(["--config", str(path), "--proxy", "http://proxy.internal:3128"])


def test_the_drain_timeout_and_log_level_from_file_and_flag(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'drain_timeout = 2.5\nlog_level = "WARNING"\n{UPSTREAM}')
    config = config_from(["--config", str(path)])
    assert (config.drain_timeout, config.log_level) == (2.5, "warning")
    assert (
        config_from(["--config", str(path), "--drain-timeout", "0"]).drain_timeout == 0
    )
    assert NodeConfig().drain_timeout == 10.0


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


def test_a_size_that_overflows_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node", "--upstream", "http://x",
         "--data-dir", str(tmp_path), "--max-store-bytes", "inf"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == (
        "tcr-mirror: error: --max-store-bytes must be a size such as 50GiB, got 'inf'\n"
    )


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
    options += " --drain-timeout"
    for option in options.split():
        assert option in result.stdout


@pytest.mark.parametrize(
    "flag", ["--config", "--credentials-file", "--node-secret-file"]
)
def test_a_file_that_is_not_utf8_is_one_line(tmp_path: Path, flag: str) -> None:
    path = tmp_path / "binary"
    path.write_bytes(b"\xff\xfe\x00 not text \x80\n")
    argv = ["--upstream", "http://127.0.0.1:5001", flag, str(path)]
    with pytest.raises(ConfigError, match="is not UTF-8 text") as raised:
        config_from(argv)
    assert "\n" not in str(raised.value)


def test_ipv6_upstreams_and_listen_addresses_are_taken() -> None:
    config = config_from(["--upstream", "https://[::1]:5001", "--listen", "[::1]:5000"])
    assert config.upstreams[0].url == "https://[::1]:5001"
    assert config.listen == ("::1", 5000)


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('data_dir = "/var/lib/a\\u0000b"', "data_dir"),
        ('ca_file = "/etc/ca\\u0000.pem"', "ca_file"),
        ('node_secret_file = "/etc/s\\u0000"', "node_secret_file"),
        (UPSTREAM + 'credentials_file = "/etc/c\\u0000"', "credentials_file"),
    ],
)
def test_a_path_holding_a_nul_is_one_line(tmp_path: Path, toml: str, key: str) -> None:
    """TOML strings may hold NUL, which every file call refuses with a
    ValueError: these were tracebacks, at start-up or while reading the file."""
    path = tmp_path / "node.toml"
    path.write_text(toml if "[[upstreams]]" in toml else f"{toml}\n{UPSTREAM}")
    with pytest.raises(ConfigError, match=f"{key} must be a path") as raised:
        config_from(["--config", str(path)])
    assert "\n" not in str(raised.value)


def test_a_data_dir_holding_a_nul_is_a_one_line_cli_error(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'data_dir = "{tmp_path}/a\\u0000b"\n{UPSTREAM}')
    result = subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node", "--config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("tcr-mirror: error: data_dir must be a path")


@pytest.mark.parametrize(
    "url",
    ["control.internal:8700", "ftp://control.internal", "http://control internal",
     "http://control.internal:99999", "http://c\u00f6ntrol..internal", "http://"],
)  # fmt: skip
def test_a_credentials_url_that_is_no_url_is_refused(tmp_path: Path, url: str) -> None:
    """httpx raises InvalidURL, which is no HTTPError, for some of these:
    the renewal task crashed the node; the others failed every renewal."""
    secret = tmp_path / "node.secret"
    secret.write_text("shared-secret\n")
    argv = ["--upstream", "http://127.0.0.1:5001", "--node-secret-file", str(secret)]
    with pytest.raises(ConfigError, match="credentials_url must be http"):
        config_from([*argv, "--credentials-url", url])
    path = tmp_path / "node.toml"
    path.write_text(f'{UPSTREAM}default = true\ncredentials_url = "{url}"\n')
    with pytest.raises(ConfigError, match="credentials_url must be http"):
        config_from(["--config", str(path), "--node-secret-file", str(secret)])


def test_a_port_of_thousands_of_digits_is_one_line() -> None:
    # int() refuses more than 4300 digits with a ValueError of its own.
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        config_from(["--upstream", "http://x", "--listen", "127.0.0.1:" + "1" * 5000])
