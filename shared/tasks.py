"""Stopping background tasks: cancel, then wait until they have really ended."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(*tasks: asyncio.Future[Any] | None) -> None:
    """Cancels every task given (None: none), then waits for each to end. Their
    CancelledError is not raised here; any other error a task ended with is."""
    running = [task for task in tasks if task is not None]
    for task in running:
        task.cancel()
    for task in running:
        with contextlib.suppress(asyncio.CancelledError):
            await task
