"""Tencent Cloud API credentials (SecretId / SecretKey / session token).

The key and the session token never appear in a repr, so a credentials
object can be logged or shown in a traceback without leaking them.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["CloudCredentials"]

_ENV_ID = "TENCENTCLOUD_SECRET_ID"
_ENV_KEY = "TENCENTCLOUD_SECRET_KEY"
_ENV_TOKEN = "TENCENTCLOUD_SESSION_TOKEN"


@dataclass(frozen=True)
class CloudCredentials:
    """A SecretId/SecretKey pair, plus an STS token for temporary keys."""

    secret_id: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.secret_id or not self.secret_key:
            raise ValueError("credentials need both a SecretId and a SecretKey")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> CloudCredentials:
        """Read the variables the official SDKs and tccli read.

        Args:
            environ: Usually ``os.environ``.

        Returns:
            Credentials from ``TENCENTCLOUD_SECRET_ID``,
            ``TENCENTCLOUD_SECRET_KEY`` and, if set,
            ``TENCENTCLOUD_SESSION_TOKEN``.

        Raises:
            ValueError: A required variable is missing or empty.
        """
        missing = [name for name in (_ENV_ID, _ENV_KEY) if not environ.get(name)]
        if missing:
            raise ValueError(f"environment variable {missing[0]} is not set")
        token = environ.get(_ENV_TOKEN) or None
        return cls(environ[_ENV_ID], environ[_ENV_KEY], token)

    @classmethod
    def from_file(cls, path: str) -> CloudCredentials:
        """Read a TOML file with ``secret_id``, ``secret_key`` and ``token``.

        Args:
            path: The file; ``token`` in it is optional.

        Returns:
            The credentials in the file.

        Raises:
            ValueError: The file is unreadable, not TOML, or lacks a field.
        """
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except OSError as exc:
            raise ValueError(
                f"cannot read credentials file {path}: {exc.strerror}"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"credentials file {path} is not TOML: {exc}") from None
        values = {}
        for name in ("secret_id", "secret_key", "token"):
            value = data.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"credentials file {path}: {name} is not a string")
            values[name] = value
        for name in ("secret_id", "secret_key"):
            if not values[name]:
                raise ValueError(f"credentials file {path} has no {name}")
        return cls(
            values["secret_id"] or "", values["secret_key"] or "", values["token"]
        )
