"""Saving a simulated account to a file and loading it back (``--state-file``).

What is kept: the instances with their endpoints, VPC links, replicas and
rules, the instance tokens, the Personal edition's account, and the key
that signs tokens, so that a registry configured with the simulator's
certificate keeps trusting it after a restart. What is not: injected
faults, rate-limit buckets and the id generator's position, which belong
to one run.

The file holds a private key and the Personal edition's password, so it is
written with mode 0600, and whole: to a temporary file first, then renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import load_pem_x509_certificate

from ._jwt import SigningKey, libtrust_kid
from ._state import (
    Endpoint,
    Instance,
    InstanceToken,
    PersonalAccount,
    Replica,
    SimState,
    VpcLink,
)

__all__ = ["SavedAccount", "StateFileError", "load", "save"]

_FORMAT = 1


class StateFileError(Exception):
    """The state file cannot be read or is not one this version wrote."""


def save(state: SimState, path: Path) -> None:
    """Write the account in ``state`` to ``path``, replacing it whole."""
    document = {
        "format": _FORMAT,
        "signing_key": _key_to_json(state.signing_key),
        "instances": [dataclasses.asdict(i) for i in state.instances.values()],
        "tokens": [dataclasses.asdict(t) for t in state.tokens.values()],
        "personal": {
            "password": state.personal.password,
            "namespaces": state.personal.namespaces,
            "repos": state.personal.repos,
            "lifecycle": state.personal.lifecycle,
        },
    }
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(document, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


@dataclass(frozen=True)
class SavedAccount:
    """An account read back from a state file."""

    signing_key: SigningKey
    instances: dict[str, Instance]
    tokens: dict[str, InstanceToken]
    personal: PersonalAccount

    def restore_into(self, state: SimState) -> None:
        """Make ``state`` hold this account (its key is given at creation)."""
        state.instances = dict(self.instances)
        state.tokens = dict(self.tokens)
        state.personal = self.personal


def load(path: Path) -> SavedAccount | None:
    """The account saved in ``path``, or None if there is no file yet.

    Raises:
        StateFileError: The file is unreadable or not a state file.
    """
    document = _read(path)
    if document is None:
        return None
    signing_key = _key_from_json(document.get("signing_key"))
    try:
        personal = document["personal"]
        return SavedAccount(
            signing_key=signing_key,
            instances={
                raw["registry_id"]: _instance_from_json(raw)
                for raw in document["instances"]
            },
            tokens={
                raw["token_id"]: InstanceToken(**raw) for raw in document["tokens"]
            },
            personal=PersonalAccount(
                password=personal["password"],
                namespaces=dict(personal["namespaces"]),
                repos=dict(personal["repos"]),
                lifecycle={
                    name: (int(keep), float(at))
                    for name, (keep, at) in personal["lifecycle"].items()
                },
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"{path}: not a simulator state file ({exc})") from None


def _read(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateFileError(f"{path}: not JSON ({exc.msg})") from None
    if not isinstance(document, dict) or document.get("format") != _FORMAT:
        raise StateFileError(f"{path}: not a simulator state file of format {_FORMAT}")
    return document


def _instance_from_json(raw: dict[str, Any]) -> Instance:
    fields = dict(raw)
    fields["endpoint"] = Endpoint(**fields["endpoint"])
    fields["vpcs"] = [VpcLink(**vpc) for vpc in fields["vpcs"]]
    fields["replicas"] = [Replica(**replica) for replica in fields["replicas"]]
    return Instance(**fields)


def _key_to_json(key: SigningKey) -> dict[str, str]:
    private = key.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {
        "private_key": private.decode(),
        "certificate": key.certificate_pem().decode(),
    }


def _key_from_json(raw: Any) -> SigningKey:
    try:
        private = serialization.load_pem_private_key(
            raw["private_key"].encode(), password=None
        )
        certificate = load_pem_x509_certificate(raw["certificate"].encode())
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StateFileError(f"the saved signing key is unusable ({exc})") from None
    if not isinstance(private, rsa.RSAPrivateKey):
        raise StateFileError("the saved signing key is not an RSA key")
    return SigningKey(private, certificate, libtrust_kid(private.public_key()))
