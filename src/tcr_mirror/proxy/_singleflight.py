"""Collapse concurrent calls for the same key into one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar, cast

import outcome
import trio

__all__ = ["SingleFlight"]

T = TypeVar("T")


class _Call(Generic[T]):
    def __init__(self) -> None:
        self.finished = trio.Event()
        self.result: outcome.Outcome[T] | None = None


class SingleFlight(Generic[T]):
    """While a call for a key runs, later callers for that key wait for it.

    They all get its result, or each a copy of its exception. The call runs
    in the first caller's task: if that task is cancelled, the waiting
    callers see :class:`trio.Cancelled` as its outcome's cause and each
    retries on its own.
    """

    def __init__(self) -> None:
        self._calls: dict[Hashable, _Call[T]] = {}

    async def do(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        while True:
            call = self._calls.get(key)
            if call is None:
                return await self._lead(key, fn)
            await call.finished.wait()
            result = call.result
            if result is not None and not _was_cancelled(result):
                # An Outcome unwraps once; the leader has used it already.
                if isinstance(result, outcome.Value):
                    return cast(T, result.value)
                assert isinstance(result, outcome.Error)
                raise _fresh(result.error) from result.error.__cause__

    async def _lead(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> T:
        call: _Call[T] = _Call()
        self._calls[key] = call
        try:
            call.result = await outcome.acapture(fn)
        finally:
            del self._calls[key]
            call.finished.set()
        return call.result.unwrap()


def _was_cancelled(result: outcome.Outcome[object]) -> bool:
    if not isinstance(result, outcome.Error):
        return False
    error = result.error
    if isinstance(error, BaseExceptionGroup):
        # A leader cancelled inside a nursery (trio's open_tcp_stream
        # connects in one) ends with its Cancelled in a group; raised in a
        # waiter, whose own scopes are not cancelled, it would end that
        # waiter's request instead of letting it retry.
        return error.split(trio.Cancelled)[0] is not None
    return isinstance(error, trio.Cancelled)


def _fresh(error: BaseException) -> BaseException:
    """A copy of ``error`` for a waiter to raise.

    One exception object raised in many tasks gathers every task's frames
    in its traceback, and keeps them alive while any task holds it.
    """
    try:
        fresh = type(error).__new__(type(error), *error.args)
    except Exception:  # a __new__ that takes other arguments than its args
        return error
    fresh.__dict__.update(error.__dict__)
    return fresh
