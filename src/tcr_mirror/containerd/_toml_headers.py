"""The table headers of a TOML document, which tomllib does not report.

containerd 2.0+ takes its list of hosts from the ``[table]`` headers of
hosts.toml rather than from the decoded document, so telling a
``[host."URL"]`` table from the same entry written as a dotted key or an
inline table needs the headers. A header is a ``[`` that starts a line
outside any value; only strings, comments and open arrays or inline tables
can make a line that starts with ``[`` something else, so those are the
tokens followed here. The document must be valid TOML (tomllib has read it).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator

_SIMPLE_KEY = r"""[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
_HEADER = re.compile(
    rf"\[[ \t]*((?:{_SIMPLE_KEY})(?:[ \t]*\.[ \t]*(?:{_SIMPLE_KEY}))*)[ \t]*\]"
)
# Multi-line strings first; a closing run of quotes may hold two of the
# string's own.
_TOKEN = re.compile(
    r'"""(?:[^"\\]|\\.|"(?!""))*"{3,5}'
    r"|'''(?:[^']|'(?!''))*'{3,5}"
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|'[^'\n]*'"
    r"|#[^\n]*"
    r"|[\[\]{}\n]"
    r"|[^\"'#\[\]{}\n]+",
    re.DOTALL,
)


def _header_keys(text: str) -> Iterator[list[str]]:
    """Yields the key of each ``[table]`` header, in order, as its parts.

    ``[[array]]`` headers name no table and are skipped.
    """
    pos, depth, line_start = 0, 0, True
    while token := _TOKEN.match(text, pos):
        kind, pos = token[0], token.end()
        if kind == "[" and depth == 0 and line_start:
            header = _HEADER.match(text, token.start())
            if header is not None:
                yield _key_parts(header[1])
                pos, line_start = header.end(), False
                continue
        if kind in ("[", "{"):
            depth += 1
        elif kind in ("]", "}"):
            depth -= 1
        line_start = kind == "\n" or (line_start and kind.isspace())


def _key_parts(key: str) -> list[str]:
    # tomllib undoes the quoting and escapes of a key that is given a value.
    node: object = tomllib.loads(f"{key} = 0")
    parts: list[str] = []
    while isinstance(node, dict):
        [(part, node)] = node.items()
        parts.append(part)
    return parts
