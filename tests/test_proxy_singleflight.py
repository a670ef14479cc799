"""SingleFlight: one call per key, every waiter gets its outcome."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tcr_mirror.proxy._errors import TooManyRequests
from tcr_mirror.proxy._singleflight import SingleFlight


async def test_waiters_share_one_call_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flight: SingleFlight[int] = SingleFlight()
    calls = 0
    results: list[int] = []

    async def slow() -> int:
        nonlocal calls
        calls += 1
        await trio.sleep(1)
        return 42

    async def ask() -> None:
        results.append(await flight.do("key", slow))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(ask)
    assert calls == 1
    assert results == [42] * 5


async def test_waiters_share_one_call_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    flight: SingleFlight[int] = SingleFlight()
    errors: list[BaseException] = []

    async def fails() -> int:
        await trio.sleep(1)
        raise LookupError("nope")

    async def ask() -> None:
        with pytest.raises(LookupError) as info:
            await flight.do("key", fails)
        errors.append(info.value)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(ask)
    assert len(errors) == 3


async def test_each_waiter_raises_an_error_of_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Raised by every waiter, one error object would gather each one's
    frames in its traceback (kept alive as long as any of them keeps it)."""
    flight: SingleFlight[int] = SingleFlight()
    errors: list[LookupError] = []
    depths: list[int] = []

    async def fails() -> int:
        await trio.sleep(1)
        raise LookupError("nope")

    async def ask() -> None:
        try:
            await flight.do("key", fails)
        except LookupError as exc:
            errors.append(exc)
            depths.append(len(traceback.extract_tb(exc.__traceback__)))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)

    assert all(str(error) == "nope" for error in errors)
    # The leader's traceback, then each waiter's: none longer than another.
    assert len(depths) == 10
    assert len(set(depths[1:])) == 1
    assert len({id(error) for error in errors}) == 10


async def test_a_waiter_s_error_keeps_its_attributes() -> None:
    flight: SingleFlight[int] = SingleFlight()
    started = trio.Event()
    release = trio.Event()

    async def fails() -> int:
        started.set()
        await release.wait()
        raise TooManyRequests("slow down", retry_after=7)

    async def ask() -> None:
        with pytest.raises(TooManyRequests) as info:
            await flight.do("key", fails)
        assert info.value.retry_after == 7
        assert info.value.headers == [("Retry-After", "7")]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await started.wait()
        nursery.start_soon(ask)
        await trio.testing.wait_all_tasks_blocked()
        release.set()


async def test_a_cancelled_leader_lets_a_waiter_retry() -> None:
    flight: SingleFlight[str] = SingleFlight()
    started = trio.Event()

    async def forever() -> str:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def quick() -> str:
        return "second"

    async with trio.open_nursery() as nursery:
        leader = trio.CancelScope()

        async def lead() -> None:
            with leader:
                await flight.do("key", forever)

        nursery.start_soon(lead)
        await started.wait()
        result: list[str] = []

        async def wait() -> None:
            result.append(await flight.do("key", quick))

        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        leader.cancel()
    assert result == ["second"]


async def test_a_leader_cancelled_inside_a_nursery_lets_a_waiter_retry() -> None:
    """A leader cancelled while its call runs a nursery (as trio's
    open_tcp_stream does, connecting to the upstream) ends with a group of
    Cancelled; a waiter must retry, not raise the leader's cancellation."""
    flight: SingleFlight[str] = SingleFlight()
    started = trio.Event()

    async def forever() -> str:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep_forever)
            started.set()
            await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def quick() -> str:
        return "second"

    result: list[str] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            leader = trio.CancelScope()

            async def lead() -> None:
                with leader:
                    await flight.do("key", forever)

            async def wait() -> None:
                result.append(await flight.do("key", quick))

            nursery.start_soon(lead)
            await started.wait()
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            leader.cancel()
    assert result == ["second"]


async def test_different_keys_do_not_share() -> None:
    flight: SingleFlight[str] = SingleFlight()
    assert await flight.do("a", _value("x")) == "x"
    assert await flight.do("b", _value("y")) == "y"


def _value(text: str) -> Callable[[], Awaitable[str]]:
    async def call() -> str:
        return text

    return call
