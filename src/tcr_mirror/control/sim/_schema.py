"""Parameter schemas for TCR actions, checked the way TCR checks them.

Every action declares its parameters with the doc's vocabulary (String,
Integer, Boolean, Array of X, a struct); :func:`check` turns a request's
parameters into clean Python values or raises :class:`SimError` with the
code the real API uses (TCR-API.md §1.6 step 7): a missing required field
is ``MissingParameter``, an unknown one ``UnknownParameter``, a wrong type
``InvalidParameter``. Bad *values* are the handlers' business
(``InvalidParameterValue`` and the action-specific codes).

GET requests carry flattened, all-string parameters (``Rule.Filters.0.Type``,
``RegistryIds.0``; §1.2). :func:`unflatten` rebuilds the nesting and
:func:`check` then coerces strings by the declared type. How strictly the
real server parses ``True``/``true`` is UNCONFIRMED; we accept both cases,
plus numeric strings for Integer fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BOOLEAN",
    "INTEGER",
    "STRING",
    "Field",
    "ListOf",
    "Scalar",
    "SimError",
    "Struct",
    "check",
    "opt",
    "req",
    "unflatten",
]


class SimError(Exception):
    """An error answer of the simulated API, in TCR's own terms."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Scalar:
    kind: str  # "String", "Integer" or "Boolean", as in the doc tables


@dataclass(frozen=True)
class ListOf:
    item: Type


@dataclass(frozen=True)
class Struct:
    fields: Mapping[str, Field]


Type = Scalar | ListOf | Struct


@dataclass(frozen=True)
class Field:
    type: Type
    required: bool


STRING = Scalar("String")
INTEGER = Scalar("Integer")
BOOLEAN = Scalar("Boolean")


def req(type_: Type) -> Field:
    """A required parameter of the given type."""
    return Field(type_, True)


def opt(type_: Type) -> Field:
    """An optional parameter of the given type."""
    return Field(type_, False)


def check(
    fields: Mapping[str, Field], params: Any, *, prefix: str = "", lenient: bool = False
) -> dict[str, Any]:
    """Validate parameters (or a struct) against its declared fields.

    Args:
        fields: The declared fields.
        params: The decoded JSON object (or the unflattened GET form).
        prefix: The path of a nested struct, for messages (``Rule.``).
        lenient: Coerce strings (GET form) to the declared scalar types.

    Returns:
        The parameters with absent/null optional fields left out.

    Raises:
        SimError: ``MissingParameter``, ``UnknownParameter`` or
            ``InvalidParameter``, in that order of precedence.
    """
    if not isinstance(params, dict):
        name = prefix.rstrip(".") or "request body"
        raise SimError("InvalidParameter", f"Parameter `{name}` type error.")
    present = {key: value for key, value in params.items() if value is not None}
    for name, field in fields.items():
        if field.required and name not in present:
            raise SimError(
                "MissingParameter",
                f"The request is missing a required parameter `{prefix}{name}`.",
            )
    for name in present:
        if name not in fields:
            raise SimError(
                "UnknownParameter", f"The parameter `{prefix}{name}` is not recognized."
            )
    return {
        name: _value(fields[name].type, value, f"{prefix}{name}", lenient)
        for name, value in present.items()
    }


def _value(type_: Type, value: Any, path: str, lenient: bool) -> Any:
    if isinstance(type_, Struct):
        return check(type_.fields, value, prefix=path + ".", lenient=lenient)
    if isinstance(type_, ListOf):
        if lenient and isinstance(value, dict):
            value = _as_list(value, path)
        if not isinstance(value, list):
            raise _type_error(path)
        return [
            _value(type_.item, item, f"{path}.{index}", lenient)
            for index, item in enumerate(value)
        ]
    return _scalar(type_.kind, value, path, lenient)


def _scalar(kind: str, value: Any, path: str, lenient: bool) -> Any:
    if kind == "String" and isinstance(value, str):
        return value
    if kind == "Boolean":
        if isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    if kind == "Integer":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if lenient and isinstance(value, str) and value.lstrip("-").isdigit():
            return int(value)
    raise _type_error(path)


def _as_list(value: dict[str, Any], path: str) -> list[Any]:
    # GET form lists arrive as {"0": ..., "1": ...}: indexes must be 0..n-1.
    if not all(key.isdigit() for key in value):
        raise _type_error(path)
    indexes = sorted(int(key) for key in value)
    if indexes != list(range(len(indexes))):
        raise _type_error(path)
    return [value[str(index)] for index in indexes]


def _type_error(path: str) -> SimError:
    return SimError("InvalidParameter", f"Parameter `{path}` type error.")


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Rebuild nested parameters from GET form pairs.

    ``Rule.Filters.0.Type=tag`` becomes ``{"Rule": {"Filters": {"0":
    {"Type": "tag"}}}}``; :func:`check` turns the digit-keyed dicts into
    lists where the schema declares an array.

    Raises:
        SimError: ``InvalidParameter`` when a name is used both as a value
            and as a container, or is given twice.
    """
    root: dict[str, Any] = {}
    for name, value in pairs:
        node = root
        *parents, leaf = name.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise _type_error(name)
            node = child
        if leaf in node:
            raise SimError("InvalidParameter", f"Parameter `{name}` is repeated.")
        node[leaf] = value
    return root
