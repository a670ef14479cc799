"""The table of simulated actions and the one path every call takes.

Each family module (:mod:`._enterprise`, :mod:`._network`,
:mod:`._personal`) lists its actions as ``name: (fields, handler, rate)``;
this module merges them. :func:`run` applies, in order: background
transitions, injected faults, the parameter schema (§1.6 step 7), the
per-action rate limit (step 8), then the handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _enterprise, _network, _personal
from ._schema import Field, check
from ._state import SimState
from ._verify import VerifiedRequest

__all__ = ["ACTIONS", "ActionSpec", "run"]

Handler = Callable[[SimState, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ActionSpec:
    """One action: its parameters, what it does, and its rate limit (per s)."""

    fields: Mapping[str, Field]
    handler: Handler
    rate: float


def _merge(
    *tables: Mapping[str, tuple[Mapping[str, Field], Handler, float]],
) -> dict[str, ActionSpec]:
    merged: dict[str, ActionSpec] = {}
    for table in tables:
        for name, (fields, handler, rate) in table.items():
            merged[name] = ActionSpec(fields, handler, rate)
    return merged


ACTIONS = _merge(_enterprise.ACTIONS, _network.ACTIONS, _personal.ACTIONS)


def run(state: SimState, request: VerifiedRequest) -> dict[str, Any]:
    """Execute a verified request against the state.

    Returns:
        The ``Response`` fields (without ``RequestId``).

    Raises:
        SimError: Whatever TCR would answer instead.
    """
    state.settle()
    fault = state.take_fault(request.action)
    if fault is not None:
        raise fault
    spec = ACTIONS[request.action]
    params = check(spec.fields, request.params, lenient=request.from_query)
    state.admit(request.action, spec.rate)
    return spec.handler(state, params)
