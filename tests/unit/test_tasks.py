"""shared/tasks.py: stopping background tasks."""

from __future__ import annotations

import asyncio

import pytest

from shared.tasks import cancel_and_wait


async def test_the_tasks_are_cancelled_and_have_ended_on_return():
    ended: list[str] = []

    async def forever(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # still cleaning up after the cancel
            ended.append(name)

    tasks = [asyncio.create_task(forever(name)) for name in "ab"]
    await asyncio.sleep(0)  # both started
    await cancel_and_wait(tasks[0], None, tasks[1])
    assert sorted(ended) == ["a", "b"] and all(task.cancelled() for task in tasks)


async def test_a_task_that_failed_raises_its_error():
    async def broken() -> None:
        raise ValueError("broken")

    task = asyncio.create_task(broken())
    await asyncio.sleep(0)
    with pytest.raises(ValueError, match="broken"):
        await cancel_and_wait(task)
    await cancel_and_wait()  # nothing to stop
