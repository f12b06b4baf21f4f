"""Reading a request stream in groups: each group is the messages that arrived while the
handler was busy with the one before (adaptive batching, as group commit does for writes).

A handler that answers every message in order, and whose cost is mostly per call (a
transaction, a decision), serves a busy stream faster when it takes what is waiting at
once: a client that waits for each answer gets groups of one, a client that sends ahead
gets larger groups, and the handler's answers stay one per message, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from shared.tasks import cancel_and_wait

T = TypeVar("T")


class _End:
    """The stream ended: cleanly (error None) or with the error its iterator raised."""

    def __init__(self, error: BaseException | None):
        self.error = error


async def arrived_together(messages: AsyncIterator[T], read_ahead: int) -> AsyncGenerator[list[T], None]:
    """The stream's messages in order, as lists: the first waited for, then every further one
    already read. A reader task reads at most `read_ahead` messages beyond those handed out
    (the stream's flow control holds the rest). An error of the stream is raised after the
    messages before it have been handed out. Close it (contextlib.aclosing) to stop the reader."""
    arrived: asyncio.Queue[T | _End] = asyncio.Queue()
    room = asyncio.Semaphore(read_ahead)

    async def read() -> None:
        try:
            while True:
                await room.acquire()
                arrived.put_nowait(await anext(messages))
        except StopAsyncIteration:
            arrived.put_nowait(_End(None))
        except BaseException as error:  # the handler gets it, after what came before
            arrived.put_nowait(_End(error))
            if isinstance(error, asyncio.CancelledError):
                raise

    reader = asyncio.create_task(read())
    try:
        while True:
            group: list[T] = []
            item = await arrived.get()
            while not isinstance(item, _End):
                group.append(item)
                room.release()
                if arrived.empty():
                    break
                item = arrived.get_nowait()
            if group:
                yield group
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
    finally:
        await cancel_and_wait(reader)
