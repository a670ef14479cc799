"""User info out of URLs and host names, for error messages and shown
files (containerd-config) and configuration errors (the node)."""

from __future__ import annotations

__all__ = ["redact"]


def _user_info(text: str) -> str:
    _, sep, rest = text.partition("://")
    return (rest if sep else text).rpartition("@")[0]


def redact(text: str) -> str:
    """Returns a URL or host name with its user info replaced by ``***``.

    This works on strings that ``urlsplit`` rejects, which are the ones that
    end up in error messages: everything between ``://`` (or the start) and
    the last ``@`` goes, so a password with a stray ``/`` or ``#`` in it
    goes too.
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    if "@" not in rest:
        return text
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
