"""Which URLs go through an HTTP proxy, and the CONNECT handshake: no sockets.

The end-to-end tests through a real proxy are in ``test_proxy_via_httpproxy``.
"""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from support.node import NodeFactory
from tcr_mirror.proxy._config import ConfigError, NodeConfig
from tcr_mirror.proxy._httpproxy import (
    HttpProxy,
    ProxyPolicy,
    ProxyRefused,
    TunnelOpening,
    parse_proxy_url,
)
from tcr_mirror.proxy.cli import _config_from_args, build_node_parser

PROXY = HttpProxy("proxy.internal", 3128)


def basic(pair: str) -> str:
    return "Basic " + base64.b64encode(pair.encode()).decode()


@pytest.mark.parametrize(
    ("text", "host", "port", "authorization"),
    [
        ("http://proxy.internal:3128", "proxy.internal", 3128, None),
        ("proxy.internal:3128", "proxy.internal", 3128, None),
        ("http://proxy.internal", "proxy.internal", 80, None),
        ("http://proxy.internal:3128/", "proxy.internal", 3128, None),
        ("http://[fd00::1]:3128", "fd00::1", 3128, None),
        ("http://alice:s3cret@proxy:8080", "proxy", 8080, basic("alice:s3cret")),
        # Percent-encoded, as a password holding '@' or ':' must be written.
        ("http://al%40ice:p%3Ass@proxy:8080", "proxy", 8080, basic("al@ice:p:ss")),
        ("http://alice@proxy:8080", "proxy", 8080, basic("alice:")),
    ],
)
def test_proxy_urls(text: str, host: str, port: int, authorization: str | None) -> None:
    proxy = parse_proxy_url(text)
    assert (proxy.host, proxy.port, proxy.authorization) == (host, port, authorization)


@pytest.mark.parametrize(
    "text",
    [
        "https://u:secret@proxy:3128",
        "socks5://u:secret@proxy:1080",
        "http://",
        "http://u:secret@proxy:99999",
        "http://u:secret@proxy:3128/some/path",
        "http://u:secret@proxy:port",
    ],
)
def test_bad_proxy_urls_are_refused_without_showing_the_password(text: str) -> None:
    with pytest.raises(ValueError, match="proxy URL must be") as raised:
        parse_proxy_url(text)
    assert "secret" not in str(raised.value)


def test_a_proxy_shows_its_address_but_never_its_credentials() -> None:
    proxy = parse_proxy_url("http://alice:s3cret@[fd00::1]:3128")
    assert proxy.address == "[fd00::1]:3128"
    assert proxy.url == "http://[fd00::1]:3128"
    for text in (repr(proxy), proxy.address, proxy.url):
        assert "s3cret" not in text
        assert proxy.authorization is not None
        assert proxy.authorization.split()[1] not in text


def test_the_environment_names_a_proxy_per_scheme() -> None:
    policy = ProxyPolicy.from_environment(
        {"HTTPS_PROXY": "http://secure:3128", "http_proxy": "plain:3128"}
    )
    assert policy.for_url("https://tcr.example/v2/") == HttpProxy("secure", 3128)
    assert policy.for_url("http://tcr.example/v2/") == HttpProxy("plain", 3128)
    assert ProxyPolicy.from_environment({}).for_url("https://tcr.example/") is None
    only_http = ProxyPolicy.from_environment({"HTTP_PROXY": "plain:3128"})
    assert only_http.for_url("https://tcr.example/") is None


def test_upper_case_variables_win_and_empty_ones_do_not_count() -> None:
    both = {"HTTPS_PROXY": "upper:1", "https_proxy": "lower:2"}
    assert ProxyPolicy.from_environment(both).for_url("https://r/") == HttpProxy(
        "upper", 1
    )
    empty_upper = {"HTTPS_PROXY": "", "https_proxy": "lower:2", "NO_PROXY": ""}
    assert ProxyPolicy.from_environment(empty_upper).for_url("https://r/") == HttpProxy(
        "lower", 2
    )


@pytest.mark.parametrize(
    "url",
    [
        "https://localhost:5000/v2/",
        "https://LOCALHOST/v2/",
        "https://127.0.0.1:5000/v2/",
        "https://127.8.9.10/v2/",
        "https://[::1]:5000/v2/",
    ],
)
def test_the_environment_never_proxies_this_host(url: str) -> None:
    policy = ProxyPolicy.from_environment({"HTTPS_PROXY": "proxy:3128"})
    assert policy.for_url(url) is None
    # A proxy the operator configured for the node is used even there.
    assert ProxyPolicy.configured(PROXY).for_url(url) == PROXY


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("*", "https://anything.example/", True),
        ("tencentcloudcr.com", "https://tencentcloudcr.com/", True),
        ("tencentcloudcr.com", "https://x.tencentcloudcr.com/", True),
        ("tencentcloudcr.com", "https://nottencentcloudcr.com/", False),
        (".tencentcloudcr.com", "https://x.tencentcloudcr.com/", True),
        (".tencentcloudcr.com", "https://tencentcloudcr.com/", False),
        ("*.tencentcloudcr.com", "https://x.tencentcloudcr.com/", True),
        ("*.tencentcloudcr.com", "https://tencentcloudcr.com/", False),
        ("TCR.Example", "https://tcr.example./", True),
        ("tcr.example:443", "https://tcr.example/", True),
        ("tcr.example:5000", "https://tcr.example/", False),
        ("tcr.example:80", "http://tcr.example/", True),
        ("10.0.0.0/8", "https://10.1.2.3/", True),
        ("10.0.0.0/8", "https://11.1.2.3/", False),
        ("10.1.2.3", "https://10.1.2.3:443/", True),
        ("10.1.2.3:5000", "https://10.1.2.3:5000/", True),
        ("10.1.2.3:5000", "https://10.1.2.3/", False),
        ("fd00::/8", "https://[fd00::5]/", True),
        ("[fd00::5]:443", "https://[fd00::5]/", True),
        ("fd00::5", "https://[fd00::6]/", False),
        # A domain entry never matches an address that ends the same way.
        ("2.3", "https://10.1.2.3/", False),
        (" a.example , b.example ", "https://b.example/", True),
        ("a.example,b.example", "https://c.example/", False),
    ],
)
def test_no_proxy_entries(no_proxy: str, url: str, direct: bool) -> None:
    environ = {"HTTPS_PROXY": "proxy:3128", "HTTP_PROXY": "proxy:3128"}
    policy = ProxyPolicy.from_environment({**environ, "NO_PROXY": no_proxy})
    assert (policy.for_url(url) is None) is direct
    configured = ProxyPolicy.configured(PROXY, no_proxy.split(","))
    assert (configured.for_url(url) is None) is direct


UNREADABLE_NO_PROXY = ["tcr.example:²", "tcr.example:x", "tcr.example:99999", ":443"]


@pytest.mark.parametrize("entry", [*UNREADABLE_NO_PROXY, "[tcr.example]:443"])
def test_a_no_proxy_entry_that_exempts_nothing_is_skipped_or_refused(
    entry: str,
) -> None:
    """Go skips what it cannot read in NO_PROXY; a node's own config is
    refused in one line instead, as a typo there is the operator's."""
    environ = {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": f"{entry},near.example"}
    policy = ProxyPolicy.from_environment(environ)
    assert policy.for_url("https://near.example/") is None
    assert policy.for_url("https://tcr.example/") == HttpProxy("proxy", 3128)
    with pytest.raises(ValueError, match="^no_proxy entry"):
        ProxyPolicy.configured(PROXY, [entry, "near.example"])


def test_a_no_proxy_entry_without_a_port_after_its_colon_is_any_port() -> None:
    policy = ProxyPolicy.configured(PROXY, ["tcr.example:"])
    assert policy.for_url("https://tcr.example:5000/") is None


def test_a_bad_proxy_variable_names_itself() -> None:
    with pytest.raises(ValueError, match="^HTTPS_PROXY in the environment: proxy"):
        ProxyPolicy.from_environment({"HTTPS_PROXY": "http://proxy:99999"})
    with pytest.raises(ValueError, match="^HTTP_PROXY in the environment: proxy"):
        ProxyPolicy.from_environment({"http_proxy": "ftp://proxy:21"})


@pytest.mark.parametrize(
    ("environ", "variable", "applies_to", "scheme"),
    [
        ({"HTTPS_PROXY": "socks5://u:s3cret@proxy:1080"}, "HTTPS_PROXY", "https",
         "socks5"),
        ({"https_proxy": "https://u:s3cret@proxy:3129"}, "https_proxy", "https",
         "https"),
        ({"HTTP_PROXY": "SOCKS5H://u:s3cret@proxy:1080"}, "HTTP_PROXY", "http",
         "socks5h"),
        ({"http_proxy": "https://proxy:3129/"}, "http_proxy", "http", "https"),
    ],
)  # fmt: skip
def test_a_proxy_that_is_not_http_is_set_aside_not_refused(
    environ: dict[str, str], variable: str, applies_to: str, scheme: str
) -> None:
    policy = ProxyPolicy.from_environment(environ)
    (ignored,) = policy.ignored
    assert (ignored.variable, ignored.applies_to, ignored.scheme) == (
        variable,
        applies_to,
        scheme,
    )
    assert ignored.address.startswith("proxy:")
    assert "s3cret" not in repr(policy)
    url = f"{applies_to}://tcr.example/v2/"
    assert policy.for_url(url) is None
    assert policy.ignored_for(url) == ignored
    # This host and NO_PROXY are direct for Go too: nothing is given up.
    assert policy.ignored_for(f"{applies_to}://127.0.0.1:5000/v2/") is None
    excepted = ProxyPolicy.from_environment({**environ, "no_proxy": "tcr.example"})
    assert excepted.ignored_for(url) is None
    other = "https" if applies_to == "http" else "http"
    assert policy.ignored_for(f"{other}://tcr.example/v2/") is None


def test_a_set_aside_proxy_s_address_shows_no_password_holding_a_slash() -> None:
    """The address is logged at start; a base64 password holds '/', and
    users write it unescaped."""
    environ = {"HTTPS_PROXY": "socks5://alice:pa/s3cret@proxy:1080"}
    (ignored,) = ProxyPolicy.from_environment(environ).ignored
    assert ignored.address == "proxy:1080"


def test_an_http_proxy_beside_a_set_aside_one_is_still_used() -> None:
    policy = ProxyPolicy.from_environment(
        {"HTTPS_PROXY": "socks5://proxy:1080", "HTTP_PROXY": "http://plain:3128"}
    )
    assert policy.for_url("http://tcr.example/") == HttpProxy("plain", 3128)
    assert [i.variable for i in policy.ignored] == ["HTTPS_PROXY"]


def test_a_set_aside_proxy_stops_the_start_only_for_an_upstream_needing_it(
    tmp_path: Path,
) -> None:
    environ = {"HTTPS_PROXY": "socks5://u:s3cret@proxy:1080", "NO_PROXY": "near"}
    direct = config_from(
        ["--upstream", "https://127.0.0.1:5001", "--upstream", "n=https://near"]
    )
    assert direct.proxy_policy(environ).ignored
    needing = config_from(
        ["--upstream", "https://127.0.0.1:5001", "--upstream", "far=https://far"]
    )
    with pytest.raises(ConfigError) as raised:
        needing.proxy_policy(environ)
    message = str(raised.value)
    assert message.startswith("HTTPS_PROXY in the environment names a socks5://")
    assert "upstream far would go through it" in message
    assert "s3cret" not in message
    # A proxy the operator configured is used instead of the environment's.
    configured = config_from(
        ["--upstream", "https://far", "--proxy", "http://proxy.internal:3128"]
    )
    assert configured.proxy_policy(environ).for_url("https://far/") == HttpProxy(
        "proxy.internal", 3128
    )


def test_connect_request_carries_the_target_and_the_credentials() -> None:
    proxy = parse_proxy_url("http://alice:s3cret@proxy:3128")
    request = TunnelOpening(proxy, "tcr.example", 443).request()
    lines = request.decode().split("\r\n")
    assert lines[0] == "CONNECT tcr.example:443 HTTP/1.1"
    assert "Host: tcr.example:443" in lines
    assert f"Proxy-Authorization: {basic('alice:s3cret')}" in lines
    assert request.endswith(b"\r\n\r\n")
    ipv6 = TunnelOpening(PROXY, "fd00::5", 443).request()
    assert ipv6.startswith(b"CONNECT [fd00::5]:443 HTTP/1.1\r\n")
    assert b"Proxy-Authorization" not in TunnelOpening(PROXY, "r", 443).request()


def test_an_answer_in_pieces_opens_the_tunnel_only_at_its_end() -> None:
    opening = TunnelOpening(PROXY, "tcr.example", 443)
    opening.request()
    answer = b"HTTP/1.1 200 Connection established\r\nVia: x\r\n\r\n"
    results = [opening.receive(answer[i : i + 1]) for i in range(len(answer))]
    assert results == [False] * (len(answer) - 1) + [True]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/1.1 407 Proxy Auth\r\ncontent-length: 0\r\n\r\n", r"answered 407 to "
         r"CONNECT tcr\.example:443 \(proxy credentials refused\)"),
        # tinyproxy 1.11 answers bad credentials with 401.
        (b"HTTP/1.0 401 Unauthorized\r\n\r\n", "answered 401 .* credentials refused"),
        (b"HTTP/1.1 403 Forbidden\r\ncontent-length: 3\r\n\r\nno!", "answered 403"),
        (b"HTTP/1.1 502 Bad Gateway\r\n\r\n", "answered 502"),
        (b"HTTP/1.1 200 OK\r\n\r\n\x16\x03\x01", "sent bytes before the tunnel"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "answered CONNECT with garbage"),
        (b"", "closed the connection before answering CONNECT"),
        (b"HTTP/1.1 200 OK\r\n", "closed the connection before answering"),
    ],
)  # fmt: skip
def test_a_refused_or_broken_tunnel_says_why(answer: bytes, message: str) -> None:
    opening = TunnelOpening(PROXY, "tcr.example", 443)
    opening.request()
    with pytest.raises(ProxyRefused, match=message):
        answer_then_close(opening, answer)


def answer_then_close(opening: TunnelOpening, answer: bytes) -> None:
    if not opening.receive(answer):
        opening.receive(b"")


def config_from(argv: list[str]) -> NodeConfig:
    return _config_from_args(build_node_parser().parse_args(argv))


def test_proxy_from_the_config_file_and_flags(tmp_path: Path) -> None:
    toml = tmp_path / "node.toml"
    toml.write_text(
        """
        proxy = "http://alice:s3cret@proxy.internal:3128"
        no_proxy = ["internal.example", "10.0.0.0/8"]
        [[upstreams]]
        url = "https://tcr.example"
        default = true
        """
    )
    config = config_from(["--config", str(toml)])
    assert config.proxy == parse_proxy_url("http://alice:s3cret@proxy.internal:3128")
    assert config.no_proxy == ("internal.example", "10.0.0.0/8")
    assert "s3cret" not in repr(config)
    policy = config.proxy_policy({"HTTPS_PROXY": "ignored:1"})
    assert policy.for_url("https://tcr.example/v2/") == config.proxy
    assert policy.for_url("https://x.internal.example/") is None

    flags = config_from(
        ["--upstream", "https://tcr.example", "--proxy", "proxy:8080",
         "--no-proxy", "a.example,b.example"]
    )  # fmt: skip
    assert flags.proxy == HttpProxy("proxy", 8080)
    assert flags.no_proxy == ("a.example", "b.example")
    without = config_from(["--upstream", "https://tcr.example"])
    assert without.proxy_policy({"HTTPS_PROXY": "env:3128"}).for_url(
        "https://tcr.example/"
    ) == HttpProxy("env", 3128)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('proxy = "ftp://proxy:21"', "proxy URL must be"),
        ("proxy = 3128", "proxy must be a non-empty string"),
        ('no_proxy = ["a"]', "no_proxy needs proxy"),
        ('proxy = "p:1"\nno_proxy = [1]', "no_proxy must be a list"),
    ],
)
def test_bad_proxy_config_is_one_clear_error(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "node.toml"
    path.write_text(toml + '\n[[upstreams]]\nurl = "https://r.example"\n')
    with pytest.raises(ConfigError, match=message):
        config_from(["--config", str(path)])


def run_node(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tcr_mirror", "node", *args],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env_proxy", "message"),
    [
        (["--proxy", "http://alice:s3cret@proxy:3128"], None,
         "put proxy credentials in the config file or HTTPS_PROXY"),
        (["--proxy", "socks5://proxy:1080"], None, "proxy URL must be"),
        (["--proxy", "https://proxy:3129"], None, "proxy URL must be"),
        ([], "socks5://alice:s3cret@proxy:1080", "HTTPS_PROXY in the environment"),
        ([], "https://alice:s3cret@proxy:3129", "tcr-mirror cannot use"),
    ],
)  # fmt: skip
def test_cli_proxy_errors_are_one_line_without_the_password(
    tmp_path: Path, args: list[str], env_proxy: str | None, message: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    if env_proxy is not None:
        env["HTTPS_PROXY"] = env_proxy
    result = run_node(
        ["--upstream", "https://tcr.example", "--data-dir", str(tmp_path), *args], env
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert message in result.stderr
    assert "s3cret" not in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("entry", UNREADABLE_NO_PROXY)
def test_cli_skips_an_unreadable_no_proxy_variable_and_refuses_the_flag(
    tmp_path: Path, entry: str
) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    # A file for a data directory: the start fails just after the proxies.
    data_dir = tmp_path / "file"
    data_dir.write_text("")
    args = ["--upstream", "https://tcr.example", "--data-dir", str(data_dir)]
    environ = {**env, "HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": entry}
    from_environment = run_node(args, environ)
    flag = run_node([*args, "--proxy", "http://proxy:3128", "--no-proxy", entry], env)

    assert "cannot use data directory" in from_environment.stderr
    assert flag.stderr.count("\n") == 1
    assert "no_proxy entry" in flag.stderr
    for result in (from_environment, flag):
        assert result.returncode == 2
        assert "Traceback" not in result.stderr


def test_a_skipped_no_proxy_entry_is_warned_about(
    node_factory: NodeFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Skipped as Go skips it, but said: a typo in NO_PROXY would otherwise
    send what was meant to go direct through the proxy, unnoticed."""
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("NO_PROXY", "tcr.example,registry:x")
    node = node_factory("--upstream", "https://tcr.example")

    skipped = [e for e in node.events() if e.get("event") == "no_proxy_entry_skipped"]

    assert [(e["level"], e["entry"]) for e in skipped] == [("warning", "registry:x")]
