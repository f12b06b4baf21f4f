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

A head never goes back, except when the database is restored to an earlier state while the
process runs. A refresh that reads a head below the revision it knew (as the poll does
within a poll interval, and every refresh after a commit) loads the feed again (`load`:
consent rebuilds its index, so no check answers from the undone state, and the changes
committed after the restore, which reuse the undone revisions, are not skipped), and a
watch stream that has sent a revision beyond the restored head ends with OUT_OF_RANGE
(`check_watch`): its caller holds events that no longer exist and must start over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from shared.errors import OutOfRange
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
        self.restored_heads: list[int] = []  # the head loaded each time the feed went back

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
        """Reads the head (and catches up with it) now, waking the watchers if it moved; a
        head below the revision known before the read means the feed went back."""
        async with self._refreshing:
            known = self.revision  # a head read after it is at least it, unless restored
            head = await self.read_head()
            if head < known:
                await self._went_back(known, head)
            elif head > self.revision:
                self.advance(await self.follow(head))

    async def read_and_advance(self) -> int:
        """The head, read now (everything up to it is committed), recorded as `advance`
        does; a head that went back is handled as `refresh` does."""
        known = self.revision
        head = await self.read_head()
        if head < known:
            await self.refresh()
        else:
            self.advance(head)
        return head

    async def _went_back(self, known: int, head: int) -> None:
        log.warning("feed_went_back", feed=self.name, known_revision=known, head=head)
        self.revision = await self.load()
        self.restored_heads.append(self.revision)
        self._wake()

    def check_watch(self, sent: int, restores_seen: int, reason: str, advice: str) -> int:
        """For a watch stream that has sent up to revision `sent` and knew of the feed's first
        `restores_seen` restores: OUT_OF_RANGE (`reason`; the message ends with `advice`) if
        the feed has since gone back below `sent`; else the restores it knows of now."""
        for head in self.restored_heads[restores_seen:]:
            if sent > head:
                raise OutOfRange(
                    f"the feed went back to revision {head} (its database was restored), "
                    f"behind revision {sent} that this stream sent: {advice}",
                    reason=reason,
                )
        return self.restores

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

    @property
    def restores(self) -> int:
        """How many times the feed has gone back since the process started."""
        return len(self.restored_heads)

    async def wait_beyond(self, revision: int, timeout: float) -> bool:
        """Waits until the feed is past `revision` (or closing, or gone back), or `timeout`
        seconds pass; True unless the time ran out."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        restores = self.restores
        while self.revision <= revision and not self.closing and self.restores == restores:
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
