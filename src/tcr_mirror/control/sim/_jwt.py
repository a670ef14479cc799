"""RS256 JSON Web Tokens signed by a key the simulator makes at start.

Two kinds of token use it. Instance tokens (``CreateInstanceToken``) mimic
TCR's: header ``{"alg": "RS256", "kid": "<libtrust key id>"}`` and claims
``ownerUin``, ``operatorUin``, ``exp``, ``nbf``, ``iat`` (+ ``tokenId`` for
long-term ones). Registry tokens (the Docker token service) must satisfy
docker-registry 2.8: it trusts a JWT whose ``x5c`` chain ends in a
certificate of its ``rootcertbundle`` (or, without ``x5c``, whose ``kid``
is the libtrust id of a key in that bundle), then checks ``iss``, ``aud``,
``exp``/``nbf`` and the ``access`` claim.

A libtrust key id is the SHA-256 of the DER SubjectPublicKeyInfo, cut to
240 bits, base32-encoded, in twelve groups of four joined by ``:``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "SigningKey",
    "b64url_decode",
    "b64url_encode",
    "libtrust_kid",
    "self_signed_ca",
]


def b64url_encode(data: bytes) -> str:
    """Base64url without padding, as JWTs use."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding.

    Raises:
        ValueError: Not base64url.
    """
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


@dataclass(frozen=True)
class SigningKey:
    """An RSA key and the self-signed certificate that vouches for it."""

    private_key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    kid: str

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    @classmethod
    def generate(
        cls, common_name: str = "tcr-mirror simulator token signer"
    ) -> SigningKey:
        """Make a fresh 2048-bit RSA key and a ten-year self-signed CA cert."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        certificate = self_signed_ca(key, common_name, days=3650)
        return cls(key, certificate, libtrust_kid(key.public_key()))

    def certificate_pem(self) -> bytes:
        """The certificate, PEM-encoded: the registry's ``rootcertbundle``."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def encode(self, claims: dict[str, Any], *, with_chain: bool = False) -> str:
        """Sign claims into a compact JWT.

        Args:
            claims: The payload.
            with_chain: Put the certificate in an ``x5c`` header (registry
                tokens); otherwise only ``kid`` (instance tokens).

        Returns:
            ``header.payload.signature``.
        """
        header: dict[str, Any] = {"typ": "JWT", "alg": "RS256", "kid": self.kid}
        if with_chain:
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            header["x5c"] = [base64.b64encode(der).decode("ascii")]
        signing_input = ".".join(
            b64url_encode(json.dumps(part, separators=(",", ":")).encode())
            for part in (header, claims)
        )
        signature = self.private_key.sign(
            signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
        )
        return f"{signing_input}.{b64url_encode(signature)}"

    def decode(self, token: str) -> dict[str, Any]:
        """Verify a JWT this key signed and return its claims.

        Expiry is not checked here: that is policy, left to the caller.

        Raises:
            ValueError: Malformed, not RS256, or not signed by this key.
        """
        parts = token.split(".")
        if len(parts) != 3:
            raise ValueError("not a compact JWT")
        try:
            header = json.loads(b64url_decode(parts[0]))
            claims = json.loads(b64url_decode(parts[1]))
            signature = b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            raise ValueError("JWT is not base64url JSON") from None
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            raise ValueError("JWT is not RS256")
        if not isinstance(claims, dict):
            raise ValueError("JWT claims are not an object")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        try:
            self.private_key.public_key().verify(
                signature, signing_input, padding.PKCS1v15(), hashes.SHA256()
            )
        except InvalidSignature:
            raise ValueError("JWT signature does not verify") from None
        return claims


def self_signed_ca(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, common_name: str, *, days: int
) -> x509.Certificate:
    """A CA certificate for ``key``, signed by itself, valid from a day ago.

    Returns:
        The certificate, good for ``days`` days from now.
    """
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )


def libtrust_kid(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The libtrust key id docker-registry derives from a public key.

    Returns:
        Twelve groups of four base32 characters joined by ``:``.
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii")
    return ":".join(encoded[index : index + 4] for index in range(0, 48, 4))
