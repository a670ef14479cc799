"""TC3-HMAC-SHA256 against the published vectors (TCR-API.md §1.5)."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from pathlib import Path

import pytest

from tcr_mirror.control import _signing

SECRET_ID = "AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE"
SECRET_KEY = "Gu5t9xGARNpq86cd98joQYCN3EXAMPLE"
CVM_BODY = (
    b'{"Limit": 1, "Filters": [{"Values": ["\\u672a\\u547d\\u540d"], '
    b'"Name": "instance-name"}]}'
)
CVM_HEADERS = {
    "content-type": "application/json; charset=utf-8",
    "host": "cvm.tencentcloudapi.com",
    "x-tc-action": "DescribeInstances",
}
TCR_BODY = b'{"RegistryId": "tcr-dg284imq", "TokenType": "temp"}'
TCR_HEADERS = {
    "content-type": "application/json",
    "host": "tcr.tencentcloudapi.com",
    "x-tc-action": "CreateInstanceToken",
}
WITH_ACTION = ("content-type", "host", "x-tc-action")


def _signature(authorization: str) -> str:
    return _signing.parse_authorization(authorization).signature


def test_vector_a_intermediate_values() -> None:
    canonical = _signing.canonical_request(
        "POST", "", CVM_HEADERS, ("content-type", "host"), CVM_BODY
    )
    assert canonical.endswith(
        "35e9c5b0e3ae67532d3c9f17ead6c90222632e5b1ff7f6e89887f1398934f064"
    )
    assert "\nhost:cvm.tencentcloudapi.com\n\ncontent-type;host\n" in canonical
    assert (
        hashlib.sha256(canonical.encode()).hexdigest()
        == "5ffe6a04c0664d6b969fab9a13bdab201d63ee709638e2749d62a09ca18d7031"
    )
    to_sign = _signing.string_to_sign(1551113065, "cvm", canonical)
    assert to_sign.split("\n")[:3] == [
        "TC3-HMAC-SHA256",
        "1551113065",
        "2019-02-25/cvm/tc3_request",
    ]


def test_vector_a_authorization_header() -> None:
    authorization = _signing.sign(
        SECRET_ID,
        SECRET_KEY,
        service="cvm",
        timestamp=1551113065,
        headers=CVM_HEADERS,
        body=CVM_BODY,
    )
    assert authorization == (
        "TC3-HMAC-SHA256 Credential=AKIDz8krbsJ5yKBZQpn74WFkmLPx3EXAMPLE/"
        "2019-02-25/cvm/tc3_request, SignedHeaders=content-type;host, "
        "Signature=72e494ea809ad7a8c8f7a4507b9bddcbaa8e581f516e8da2f66e2c5a96525168"
    )


@pytest.mark.parametrize(
    ("key", "signed", "expected"),
    [
        (
            "Gu5t9xGARNpq86cd98joQYCN3*******",
            ("content-type", "host"),
            "2230eefd229f582d8b1b891af7107b91597240707d778ab3738f756258d7652c",
        ),
        (
            SECRET_KEY,
            WITH_ACTION,
            "644be983de9a8a3f00db8eadaba61467c3b429e2215758ba897b738ca469fd26",
        ),
    ],
)
def test_vector_a_variants(key: str, signed: tuple[str, ...], expected: str) -> None:
    authorization = _signing.sign(
        SECRET_ID,
        key,
        service="cvm",
        timestamp=1551113065,
        headers=CVM_HEADERS,
        body=CVM_BODY,
        signed_headers=signed,
    )
    assert _signature(authorization) == expected


def test_vector_b_lowercases_the_action_and_matches_published_hash() -> None:
    canonical = _signing.canonical_request(
        "POST", "", CVM_HEADERS, WITH_ACTION, CVM_BODY
    )
    assert "\nx-tc-action:describeinstances\n\ncontent-type;host;x-tc-action\n" in (
        canonical
    )
    assert (
        hashlib.sha256(canonical.encode()).hexdigest()
        == "7019a55be8395899b900fb5564e4200d984910f34794a27cb3fb7d10ff6a1e84"
    )


@pytest.mark.parametrize(
    ("method", "query", "headers", "body", "signed", "expected"),
    [
        (
            "POST",
            "",
            TCR_HEADERS,
            TCR_BODY,
            ("content-type", "host"),
            "d730594f763ff1975829cdb9a2c206f1460de52966699ebdc8ce29983c2ee918",
        ),
        (
            "POST",
            "",
            TCR_HEADERS,
            TCR_BODY,
            WITH_ACTION,
            "84149b2f27722647ca1b0c24497adb63c29ac267b2a1aa92731e360fd4be5564",
        ),
        (
            "GET",
            "RegistryId=tcr-dg284imq",
            {**TCR_HEADERS, "content-type": "application/x-www-form-urlencoded"},
            b"",
            ("content-type", "host"),
            "05668792af6697c78e981f081c7dea3715d4a531ece01326a64dad8bf0767338",
        ),
    ],
)
def test_vector_c_tcr(
    method: str,
    query: str,
    headers: dict[str, str],
    body: bytes,
    signed: tuple[str, ...],
    expected: str,
) -> None:
    authorization = _signing.sign(
        SECRET_ID,
        SECRET_KEY,
        service="tcr",
        timestamp=1735877397,
        headers=headers,
        body=body,
        method=method,
        query=query,
        signed_headers=signed,
    )
    assert "/2025-01-03/tcr/tc3_request" in authorization
    assert _signature(authorization) == expected


def test_vector_c_intermediate_hashes() -> None:
    canonical = _signing.canonical_request(
        "POST", "", TCR_HEADERS, ("content-type", "host"), TCR_BODY
    )
    assert canonical.endswith(
        "2a6590ade16eedcc0b2e73e21e186c238f7b3948b865e3ea4bc2cbde58abca56"
    )
    assert (
        hashlib.sha256(canonical.encode()).hexdigest()
        == "078d609b31eb0363d1af6caed77460582b51cd817f2551e91a9083423b9627f1"
    )


def _tcr_signature(**changes: object) -> str:
    request: dict[str, object] = {
        "service": "tcr",
        "timestamp": 1735877397,
        "headers": TCR_HEADERS,
        "body": TCR_BODY,
    }
    request.update(changes)
    secret_key = str(request.pop("secret_key", SECRET_KEY))
    return _signature(_signing.sign(SECRET_ID, secret_key, **request))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes",
    [
        {"body": TCR_BODY.replace(b"temp", b"longterm")},
        {"body": TCR_BODY.replace(b", ", b",")},  # re-serialised, same JSON
        {"headers": {**TCR_HEADERS, "host": "tcr.ap-guangzhou.tencentcloudapi.com"}},
        {"headers": {**TCR_HEADERS, "content-type": "application/json; charset=utf-8"}},
        {"timestamp": 1735877398},
        {"service": "cvm"},
        {"secret_key": SECRET_KEY + "x"},
        {"method": "GET"},
        {"query": "RegistryId=tcr-dg284imq"},
    ],
)
def test_any_tampering_changes_the_signature(changes: dict[str, object]) -> None:
    baseline = "d730594f763ff1975829cdb9a2c206f1460de52966699ebdc8ce29983c2ee918"
    assert _tcr_signature() == baseline
    assert _tcr_signature(**changes) != baseline


def test_credential_date_is_utc_not_local() -> None:
    # 2019-02-25 23:30 UTC is already 2019-02-26 in UTC+8.
    assert _signing.credential_date(1551137400) == "2019-02-25"
    assert _signing.credential_date(1551139200) == "2019-02-26"


@pytest.mark.parametrize(
    "value",
    [
        "",
        "Bearer abc",
        "TC3-HMAC-SHA256 Credential=AKID/2019-02-25/cvm/tc3_request",
        "TC3-HMAC-SHA256 Credential=AKID/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host, Signature=nothex",
        "HMAC-SHA1 Credential=AKID/2019-02-25/cvm/tc3_request, "
        "SignedHeaders=content-type;host, Signature=" + "0" * 64,
    ],
)
def test_parse_authorization_rejects_malformed(value: str) -> None:
    with pytest.raises(ValueError, match="TC3-HMAC-SHA256"):
        _signing.parse_authorization(value)


def test_parse_authorization_round_trip_and_repr_hides_signature() -> None:
    parsed = _signing.parse_authorization(
        _signing.sign(
            SECRET_ID,
            SECRET_KEY,
            service="tcr",
            timestamp=1735877397,
            headers=TCR_HEADERS,
            body=TCR_BODY,
            signed_headers=WITH_ACTION,
        )
    )
    assert parsed.secret_id == SECRET_ID
    assert parsed.date == "2025-01-03"
    assert parsed.signed_headers == WITH_ACTION
    assert parsed.signature == (
        "84149b2f27722647ca1b0c24497adb63c29ac267b2a1aa92731e360fd4be5564"
    )
    assert parsed.signature not in repr(parsed)


SANS_IO = {
    "tcr_mirror.control._signing",
    "tcr_mirror.control.sim._verify",
    "tcr_mirror.control.sim._schema",
    "tcr_mirror.control.sim._state",
    "tcr_mirror.control.sim._jwt",
    "tcr_mirror.control.sim._enterprise",
    "tcr_mirror.control.sim._network",
    "tcr_mirror.control.sim._personal",
    "tcr_mirror.control.sim._actions",
    "tcr_mirror.control.sim._registry_auth",
}


def _imports(module: str) -> set[str]:
    """Absolute names of everything a module imports (relative ones resolved)."""
    spec = importlib.util.find_spec(module)
    assert spec is not None
    assert spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    package = module.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = (
                importlib.util.resolve_name(
                    "." * node.level + (node.module or ""), package
                )
                if node.level
                else node.module or ""
            )
            names.update(
                f"{base}.{alias.name}" if node.module is None else base
                for alias in node.names
            )
    return names


@pytest.mark.parametrize("module", sorted(SANS_IO))
def test_sans_io_modules_do_no_io(module: str) -> None:
    imported = _imports(module)
    for name in imported:
        top = name.split(".")[0]
        assert top not in {"trio", "httpx", "h11", "socket", "anyio"}, name
        if name.startswith("tcr_mirror."):
            assert name in SANS_IO, f"{module} imports {name}, which does I/O"
