"""Sans-IO upstream authentication: challenges, token answers, Retry-After."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tcr_mirror.proxy._auth import (
    Challenge,
    Credentials,
    TokenCache,
    basic_authorization,
    parse_challenge,
    parse_retry_after,
    parse_token_response,
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


def test_token_cache_drops_tokens_at_their_renewal_time() -> None:
    cache = TokenCache()
    key = ("realm", "service", "repository:a:pull")
    cache.put(key, "token", renew_at=100)
    assert cache.get(key, 99) == "token"
    assert cache.get(("realm", "service", "repository:b:pull"), 99) is None
    assert cache.get(key, 100) is None
    assert cache.get(key, 50) is None  # dropped, not just hidden


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
