"""until_disconnect: a hang-up cancels the work (499); nothing else is mistaken for one."""

from __future__ import annotations

import asyncio

import pytest
from starlette.types import Message

from service.disconnect import ClientDisconnected, until_disconnect


class Channel:
    """An ASGI receive() whose next message the test sends when it likes."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue[Message] = asyncio.Queue()

    async def receive(self) -> Message:
        return await self.messages.get()

    def hang_up(self) -> None:
        self.messages.put_nowait({"type": "http.disconnect"})


async def test_a_hang_up_cancels_the_work_and_answers_499() -> None:
    channel, seen = Channel(), []

    async def work() -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        return "done"

    async def caller() -> str:
        return await until_disconnect(channel.receive, work())

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    channel.hang_up()
    with pytest.raises(ClientDisconnected):
        await task
    assert seen == ["cancelled"]


async def test_finished_work_is_returned_and_a_later_hang_up_cancels_nothing() -> None:
    channel = Channel()

    async def caller() -> tuple[str, str]:
        result = await until_disconnect(channel.receive, asyncio.sleep(0.01, "result"))
        channel.hang_up()  # after the work: the watcher is gone, this task carries on
        await asyncio.sleep(0.05)
        return result, "carried on"

    assert await caller() == ("result", "carried on")
    assert channel.messages.qsize() == 1  # nobody was listening any more


async def test_a_shutdown_cancellation_stays_a_cancellation() -> None:
    channel = Channel()
    task = asyncio.create_task(until_disconnect(channel.receive, asyncio.sleep(10)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_shutdown_and_a_hang_up_together_stay_a_cancellation() -> None:
    channel = Channel()
    task = asyncio.create_task(until_disconnect(channel.receive, asyncio.sleep(10)))
    await asyncio.sleep(0.01)
    channel.hang_up()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_works_own_error_passes_through() -> None:
    channel = Channel()

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad image")

    with pytest.raises(ValueError, match="bad image"):
        await until_disconnect(channel.receive, failing())
