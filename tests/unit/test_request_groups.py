"""shared/request_groups.py: a request stream read in groups of what has already arrived."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from shared.request_groups import arrived_together

END = object()


class Source:
    """A request stream the test feeds: put() messages, an exception (raised by the stream)
    or END; `closed` once the stream's generator has been closed or cancelled."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.closed = asyncio.Event()

    def put(self, *items: object) -> None:
        for item in items:
            self.queue.put_nowait(item)

    async def messages(self) -> AsyncIterator[object]:
        try:
            while (item := await self.queue.get()) is not END:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.closed.set()


async def _rest(groups: AsyncIterator[list[object]]) -> list[list[object]]:
    return [group async for group in groups]


async def test_what_has_arrived_comes_as_one_group_in_order():
    source = Source()
    source.put(1, 2, 3)
    async with contextlib.aclosing(arrived_together(source.messages(), 8)) as groups:
        assert await anext(groups) == [1, 2, 3]
        source.put(4)  # arrives while nothing is waiting: a group of its own
        assert await anext(groups) == [4]
        source.put(5, 6, END)
        assert await _rest(groups) == [[5, 6]]


async def test_the_reader_stays_at_most_read_ahead_messages_ahead():
    source = Source()
    source.put(1, 2, 3, 4, 5, END)
    groups = arrived_together(source.messages(), 2)
    assert await _rest(groups) == [[1, 2], [3, 4], [5]]


async def test_an_error_of_the_stream_comes_after_the_messages_before_it():
    source = Source()
    source.put(1, 2, ValueError("malformed"), 3)
    groups = arrived_together(source.messages(), 8)
    assert await anext(groups) == [1, 2]
    with pytest.raises(ValueError, match="malformed"):
        await anext(groups)


async def test_closing_the_groups_stops_the_reader_and_closes_the_stream():
    source = Source()
    source.put(1)
    groups = arrived_together(source.messages(), 8)
    assert await anext(groups) == [1]
    await groups.aclose()  # the reader was waiting for a message that never comes
    await asyncio.wait_for(source.closed.wait(), timeout=5)


async def test_an_empty_stream_gives_no_group():
    source = Source()
    source.put(END)
    assert await _rest(arrived_together(source.messages(), 8)) == []
