"""Sans-IO upstream authentication: challenges, token answers, Retry-After,
and what a redirect may carry."""

from __future__ import annotations

import email.utils
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcr_mirror.proxy._auth import (
    MAX_RETRY_AFTER,
    Challenge,
    Credentials,
    RealmRefused,
    RedirectRefused,
    TokenCache,
    basic_authorization,
    origin,
    parse_challenge,
    parse_retry_after,
    parse_token_response,
    redirect_target,
    token_realm,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.example/token",service="registry",'
            'scope="repository:a/b:pull"',
            Challenge(
                "bearer",
                {
                    "realm": "https://auth.example/token",
                    "service": "registry",
                    "scope": "repository:a/b:pull",
                },
            ),
        ),
        (
            'Basic realm="Registry Realm"',
            Challenge("basic", {"realm": "Registry Realm"}),
        ),
        (
            "Bearer realm=bare,service=s",
            Challenge("bearer", {"realm": "bare", "service": "s"}),
        ),
        (
            'Bearer realm="with \\"quote\\""',
            Challenge("bearer", {"realm": 'with "quote"'}),
        ),
        ("", None),
        ("123 x", None),
    ],
)
def test_challenges(header: str, expected: Challenge | None) -> None:
    assert parse_challenge(header) == expected


@given(st.text(max_size=200))
def test_any_challenge_header_parses_or_is_none(header: str) -> None:
    challenge = parse_challenge(header)
    if challenge is not None:
        assert challenge.scheme.isalpha()


def test_basic_authorization_and_hidden_password() -> None:
    credentials = Credentials("alice", "s3cret")
    assert basic_authorization(credentials) == "Basic YWxpY2U6czNjcmV0"
    assert "s3cret" not in repr(credentials)


def test_token_responses() -> None:
    assert parse_token_response(b'{"token": "t", "expires_in": 300}', 1000) == (
        "t",
        1290,
    )
    # access_token is the OAuth spelling; no expires_in means 60 s.
    assert parse_token_response(b'{"access_token": "a"}', 0) == ("a", 50)
    # A token shorter-lived than the margin is renewed a quarter early.
    assert parse_token_response(b'{"token": "t", "expires_in": 8}', 0) == ("t", 6)
    for bad in (b"not json", b"[]", b'{"token": ""}', b'{"token": 5}'):
        with pytest.raises(ValueError):
            parse_token_response(bad, 0)


@pytest.mark.parametrize("lifetime", [b"NaN", b"Infinity", b"1e400"])
def test_a_token_that_would_live_for_ever_lives_the_default(lifetime: bytes) -> None:
    body = b'{"token": "t", "expires_in": %s}' % lifetime
    assert parse_token_response(body, 0) == ("t", 50)


@pytest.mark.parametrize("token", ["caf\u00e9", "two words", "line\nbreak"])
def test_a_token_no_header_can_carry_is_no_token(token: str) -> None:
    """Sent on, it crashed building the request (or split the header)."""
    body = json.dumps({"token": token}).encode()
    with pytest.raises(ValueError, match="no header can carry"):
        parse_token_response(body, 0)


def test_token_cache_drops_tokens_at_their_renewal_time() -> None:
    cache = TokenCache()
    key = ("realm", "service", "repository:a:pull")
    cache.put(key, "token", renew_at=100)
    assert cache.get(key, 99) == "token"
    assert cache.get(("realm", "service", "repository:b:pull"), 99) is None
    assert cache.get(key, 100) is None
    assert cache.get(key, 50) is None  # dropped, not just hidden


def test_token_cache_drops_a_refused_token_only_while_it_is_kept() -> None:
    cache = TokenCache()
    key = ("realm", "service", "repository:a:pull")
    cache.put(key, "new", renew_at=100)
    cache.drop(key, "old")  # a late refusal of the token replaced
    assert cache.get(key, 0) == "new"
    cache.drop(key, "new")
    assert cache.get(key, 0) is None


def test_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("30", now) == 30
    assert parse_retry_after("0", now) == 1
    assert parse_retry_after(None, now) == 1
    assert parse_retry_after("soon", now) == 1
    in_a_minute = email.utils.formatdate(now + 60, usegmt=True)
    assert parse_retry_after(in_a_minute, now) == pytest.approx(60, abs=1)
    long_ago = email.utils.formatdate(now - 600, usegmt=True)
    assert parse_retry_after(long_ago, now) == 1


def test_retry_after_is_capped_at_a_few_minutes() -> None:
    now = 1_700_000_000.0
    assert MAX_RETRY_AFTER <= 600
    assert parse_retry_after("86400", now) == MAX_RETRY_AFTER
    assert parse_retry_after("9" * 400, now) == MAX_RETRY_AFTER
    next_year = email.utils.formatdate(now + 365 * 86400, usegmt=True)
    assert parse_retry_after(next_year, now) == MAX_RETRY_AFTER


@pytest.mark.parametrize("form", ["asctime", "-0000"])
def test_an_http_date_without_a_zone_is_utc_wherever_the_node_is(
    form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read as local time, it was off by the node's UTC offset: eight hours
    on a node in China, so a minute's wait became one second."""
    now = 1_700_000_000.0
    if form == "asctime":
        header = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(now + 60))
    else:
        header = email.utils.formatdate(now + 60)
        assert header.endswith(" -0000")
    monkeypatch.setenv("TZ", "CST-8")
    time.tzset()
    try:
        delay = parse_retry_after(header, now)
    finally:
        monkeypatch.undo()
        time.tzset()

    assert delay == pytest.approx(60, abs=1)


@pytest.mark.parametrize("header", ["\u00b2", "1\u00b9", "\u2460"])
def test_a_retry_after_of_digits_that_are_not_ascii_is_one_second(
    header: str,
) -> None:
    """A registry's Latin-1 header byte 0xB2 arrives as "\u00b2": str.isdigit()
    takes it and float() refused it, crashing the request."""
    assert parse_retry_after(header, 1_700_000_000.0) == 1


@given(st.text(max_size=60))
def test_any_retry_after_is_between_one_second_and_the_cap(header: str) -> None:
    assert 1 <= parse_retry_after(header, 1_700_000_000.0) <= MAX_RETRY_AFTER


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://Registry.Example/v2/", ("https", "registry.example", 443)),
        ("https://registry.example:443/v2/", ("https", "registry.example", 443)),
        ("http://registry.example/v2/", ("http", "registry.example", 80)),
        ("http://user:pw@10.0.0.1:5000/x", ("http", "10.0.0.1", 5000)),
        ("https://[::1]:8443/", ("https", "::1", 8443)),
        ("https://registry.example./", ("https", "registry.example", 443)),
    ],
)
def test_origins(url: str, expected: tuple[str, str, int]) -> None:
    assert origin(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ftp://host/x",
        "https:///path",
        "https://host:port/",
        "/relative",
        "http://[::1/",
    ],
)
def test_no_origin_without_an_http_scheme_and_a_host(url: str) -> None:
    with pytest.raises(RedirectRefused):
        origin(url)


@pytest.mark.parametrize(
    ("url", "location", "expected"),
    [
        # Relative locations resolve against the URL asked.
        ("https://r.example/v2/a/blobs/x", "/storage/1", "https://r.example/storage/1"),
        ("https://r.example/v2/a/blobs/x", "y", "https://r.example/v2/a/blobs/y"),
        # Anywhere over HTTPS, and anywhere from plain HTTP.
        ("https://r.example/v2/", "https://s3.example/b?sig=1", "https://s3.example/b?sig=1"),
        ("http://r.example/v2/", "https://s3.example/b", "https://s3.example/b"),
        ("http://r.example/v2/", "http://s3.example/b", "http://s3.example/b"),
        # User info is no credential to send on, nor part of a Host.
        ("https://r.example/v2/", "https://u:p@s3.example:8443/b?s=1",
         "https://s3.example:8443/b?s=1"),
        ("https://r.example/v2/", "https://u@[::1]/b", "https://[::1]/b"),
    ],
)  # fmt: skip
def test_redirect_targets(url: str, location: str, expected: str) -> None:
    assert redirect_target(url, location) == expected


@pytest.mark.parametrize(
    "location",
    [
        "http://r.example/v2/a/blobs/x",  # the same host and port, in clear
        "http://r.example:443/v2/a/blobs/x",
        "http://s3.example/b?X-Amz-Signature=secret",
        "ftp://s3.example/b",
        "https://:443/no-host",
        "https://[::1/b?X-Amz-Signature=secret",  # never closed
    ],
)
def test_redirects_down_from_https_or_nowhere_are_refused(location: str) -> None:
    with pytest.raises(RedirectRefused) as refused:
        redirect_target("https://r.example/v2/a/blobs/x", location)
    # A signed storage URL's query may be a credential: never in the message.
    assert "secret" not in str(refused.value)


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        # Raw UTF-8 and spaces, which h11 would not put on a request line.
        ("/storage/caf\u00e9", "https://r.example/storage/caf%C3%A9"),
        ("/storage/a b?x=1 2", "https://r.example/storage/a%20b?x=1%202"),
        # What is percent-encoded already stays as it is.
        ("/storage/a%20b?sig=a%2Bb", "https://r.example/storage/a%20b?sig=a%2Bb"),
    ],
)
def test_redirect_targets_go_on_the_wire_percent_encoded(
    location: str, expected: str
) -> None:
    assert redirect_target("https://r.example/v2/a/blobs/x", location) == expected


@pytest.mark.parametrize(
    ("registry", "realm"),
    [
        ("https://r.example", "https://auth.example/token"),
        ("http://r.example", "http://auth.example/token"),
        ("http://r.example", "https://auth.example/token"),
    ],
)
def test_token_realms(registry: str, realm: str) -> None:
    assert token_realm(registry, realm) == realm


@pytest.mark.parametrize(
    "realm", ["http://auth.example/token", "", "/token", "ftp://auth.example/t"]
)
def test_a_registry_on_https_gets_no_realm_in_clear_or_nowhere(realm: str) -> None:
    with pytest.raises(RealmRefused):
        token_realm("https://r.example", realm)
