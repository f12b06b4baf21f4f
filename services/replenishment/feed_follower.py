"""Follows one feed of feed_heads ('slots' or 'orders') for watch streams.

Wakes the watchers when the feed's head revision moves: by polling it (writes of other
replicas, and of this one: within `poll_interval`), or at once through `refresh`. Ends
them (`close_watches`) when the server starts to stop, so callers watch again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.engine import Connection

from services.replenishment.store import current_revision
from shared.db import Database
from shared.log import get_logger

log = get_logger("najimi.replenishment.feeds")


class FeedFollower:
    def __init__(self, database: Database, feed: str, poll_interval: float = 0.25):
        self.db = database
        self.feed = feed
        self.revision = 0
        self.closing = False
        self._poll_interval = poll_interval
        self._changed = asyncio.Condition()
        self._poller: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.revision = await self.db.read(self.head)
        self._poller = asyncio.create_task(self._poll())

    async def close_watches(self) -> None:
        """Ends every watch stream (OK; callers watch again from their last revision)."""
        self.closing = True
        async with self._changed:
            self._changed.notify_all()

    async def stop(self) -> None:
        await self.close_watches()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    def head(self, connection: Connection) -> int:
        return current_revision(connection, self.feed)

    async def refresh(self) -> None:
        """Reads the feed head and wakes the watchers if it moved."""
        revision = await self.db.read(self.head)
        if revision > self.revision:
            self.revision = revision
            async with self._changed:
                self._changed.notify_all()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            try:
                await self.refresh()
            except Exception as error:  # a database hiccup must not end the poller
                log.warning("feed_poll_failed", feed=self.feed, error=type(error).__name__)

    async def wait_beyond(self, revision: int, timeout: float) -> bool:
        """Waits until the feed is past `revision` (or closing) or `timeout` seconds pass."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.revision > revision or self.closing), timeout
                )
            except TimeoutError:
                return False
        return True
