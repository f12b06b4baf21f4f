"""Wakes one process's watch streams when the feed they follow moves.

A feed is a table of events numbered by revisions that commit in order (consent's changes,
replenishment's order and slot feeds). A `FeedWatch` keeps the head revision this process
has seen, and a watch stream waits until the head passes the revision it has sent
(`wait_beyond`). The head is read again:
- at once, after this process commits to the feed: `refresh` (awaited), or `poke` (one
  read of the head for every watcher, none while nobody watches: cheap on hot paths);
- every `poll_interval` seconds, for what other replicas commit (only while a stream
  watches, for a feed that keeps nothing else up to date: `poll_unwatched=False`).

`close_watches` ends every stream when the server begins to stop (callers watch again,
elsewhere, from their last revision). A subclass says how to read the head (`read_head`)
and may keep more than the revision up to date (`load`, `follow`: e.g. consent's index).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.feeds")


class FeedWatch:
    def __init__(self, name: str, poll_interval: float, poll_unwatched: bool = True):
        self.name = name
        self.revision = 0
        self.closing = False
        self._poll_interval = poll_interval
        self._poll_unwatched = poll_unwatched
        self._moved = asyncio.Event()  # replaced on every move: set wakes its waiters once
        self._refreshing = asyncio.Lock()
        self._watchers = 0
        self._poked = False
        self._poller: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def read_head(self) -> int:
        """The revision of the feed's latest committed event."""
        raise NotImplementedError

    async def follow(self, head: int) -> int:
        """Catches up with the feed up to `head` (committed); returns the revision reached."""
        return head

    async def load(self) -> int:
        """Reads what the process keeps of the feed at start; returns the revision reached."""
        return await self.read_head()

    async def start(self) -> None:
        """Loads the feed and polls its head from now on."""
        self.revision = await self.load()
        self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        await self.close_watches()
        await cancel_and_wait(self._poller, self._refresher)

    async def close_watches(self) -> None:
        """Ends every watch stream (they return; callers watch again from their last revision)."""
        self.closing = True
        self._wake()

    def advance(self, revision: int) -> None:
        """Records that the feed reached `revision`, waking the watchers if it moved."""
        if revision > self.revision:
            self.revision = revision
            self._wake()

    async def refresh(self) -> None:
        """Reads the head (and catches up with it) now, waking the watchers if it moved."""
        async with self._refreshing:
            head = await self.read_head()
            if head > self.revision:
                self.advance(await self.follow(head))

    def poke(self) -> None:
        """Call after this process committed to the feed: the watchers see it at once. One
        refresh serves every poke made while it runs; nothing happens while nobody watches."""
        if not self._watchers:
            return
        self._poked = True
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.create_task(self._refresh_while_poked())

    @contextlib.contextmanager
    def watched(self) -> Iterator[None]:
        """Held by a watch stream for its whole life, so that pokes refresh the head."""
        self._watchers += 1
        try:
            yield
        finally:
            self._watchers -= 1

    async def wait_beyond(self, revision: int, timeout: float) -> bool:
        """Waits until the feed is past `revision` (or closing), or `timeout` seconds pass;
        True unless the time ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.revision <= revision and not self.closing:
            moved = self._moved
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                async with asyncio.timeout(remaining):  # not wait_for: it can swallow a cancel (3.11)
                    await moved.wait()
            except TimeoutError:
                return False
        return True

    def _wake(self) -> None:
        self._moved.set()
        self._moved = asyncio.Event()

    async def _refresh_while_poked(self) -> None:
        while self._poked:
            self._poked = False  # a poke during the read below reads again
            await self._logged_refresh()

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval)
            if self._watchers or self._poll_unwatched:
                await self._logged_refresh()

    async def _logged_refresh(self) -> None:
        try:
            await self.refresh()
        except Exception as error:  # a database hiccup must not end the poller
            log.warning("feed_refresh_failed", feed=self.name, error=type(error).__name__)
