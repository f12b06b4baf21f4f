"""shared/feed_watch.py: pokes wake the watchers at once, with one read of the head for all
of them, and none while nobody watches."""

from __future__ import annotations

import asyncio

from shared.errors import OutOfRange
from shared.feed_watch import FeedWatch


class CountedFeed(FeedWatch):
    def __init__(self, poll_interval: float = 3600.0, poll_unwatched: bool = True) -> None:
        # By default only pokes and refreshes read the head.
        super().__init__("test", poll_interval, poll_unwatched)
        self.head = 0
        self.reads = 0

    async def read_head(self) -> int:
        self.reads += 1
        await asyncio.sleep(0)  # a database read yields to the loop
        return self.head


async def test_a_poke_without_watchers_reads_nothing():
    feed = CountedFeed()
    await feed.start()
    try:
        reads = feed.reads
        feed.head = 5
        feed.poke()
        await asyncio.sleep(0)
        assert feed.reads == reads and feed.revision == 0
    finally:
        await feed.stop()


async def test_a_poke_wakes_every_watcher_with_one_read():
    feed = CountedFeed()
    await feed.start()
    try:
        with feed.watched(), feed.watched():
            waiters = [asyncio.create_task(feed.wait_beyond(0, 60)) for _ in range(2)]
            await asyncio.sleep(0)
            reads = feed.reads
            feed.head = 3
            for _ in range(5):
                feed.poke()
            assert await asyncio.wait_for(asyncio.gather(*waiters), 5) == [True, True]
        assert feed.revision == 3 and feed.reads - reads <= 2  # one, plus one for pokes during it
    finally:
        await feed.stop()


async def test_waiting_times_out_and_closing_ends_the_wait():
    feed = CountedFeed()
    await feed.start()
    try:
        assert await feed.wait_beyond(0, 0.01) is False
        waiter = asyncio.create_task(feed.wait_beyond(0, 60))
        await asyncio.sleep(0)
        await feed.close_watches()
        assert await asyncio.wait_for(waiter, 5) is True
    finally:
        await feed.stop()


async def test_a_feed_polled_only_while_watched_reads_nothing_unwatched():
    feed = CountedFeed(poll_interval=0.005, poll_unwatched=False)
    await feed.start()
    try:
        reads = feed.reads
        feed.head = 2
        await asyncio.sleep(0.1)  # twenty poll intervals with nobody watching
        assert feed.reads == reads and feed.revision == 0
        with feed.watched():  # the poll (no poke) finds what another replica committed
            assert await feed.wait_beyond(0, 5) is True
        assert feed.revision == 2
    finally:
        await feed.stop()


class RestorableFeed(CountedFeed):
    """A feed whose head a test can move back, as a restored database does."""

    def __init__(self) -> None:
        super().__init__()
        self.loads = 0
        self.during_read = None  # called while a read of the head is under way

    async def load(self) -> int:
        self.loads += 1
        return self.head

    async def read_head(self) -> int:
        head = self.head
        if self.during_read is not None:
            self.during_read()
        await asyncio.sleep(0)
        return head


async def test_a_head_that_went_back_loads_the_feed_again_and_ends_watches_beyond_it():
    feed = RestorableFeed()
    feed.head = 5
    await feed.start()
    try:
        assert (feed.revision, feed.loads, feed.restores) == (5, 1, 0)
        waiter = asyncio.create_task(feed.wait_beyond(5, 60))
        await asyncio.sleep(0)
        feed.head = 2  # restored
        await feed.refresh()
        assert (feed.revision, feed.loads, feed.restores) == (2, 2, 1)
        assert await asyncio.wait_for(waiter, 5) is True  # woken, though not past 5
        try:
            feed.check_watch(5, 0, "REVISION_AHEAD", "start again")
        except OutOfRange as error:
            assert error.reason == "REVISION_AHEAD" and error.message.endswith("start again")
        else:
            raise AssertionError("a watch beyond the restored head must end")
        assert feed.check_watch(2, 0, "REVISION_AHEAD", "") == 1  # nothing it sent was undone
        assert feed.check_watch(5, 1, "REVISION_AHEAD", "") == 1  # it knew of that restore
        feed.head = 3
        assert await feed.read_and_advance() == 3 and feed.revision == 3 and feed.restores == 1
        feed.head = 1
        assert await feed.read_and_advance() == 1 and feed.revision == 1 and feed.restores == 2
    finally:
        await feed.stop()


async def test_a_head_read_while_another_read_advanced_the_feed_is_not_a_restore():
    feed = RestorableFeed()
    feed.head = 5
    await feed.start()
    try:
        # The head is read as 6; before the read returns, a newer read advanced the feed to 7.
        feed.head = 6

        def newer_read() -> None:
            feed.advance(7)

        feed.during_read = newer_read
        await feed.refresh()
        assert (feed.revision, feed.loads, feed.restores) == (7, 1, 0)
        feed.head = 8  # the same with read_and_advance: read as 8 while another read reached 9

        def newest_read() -> None:
            feed.advance(9)

        feed.during_read = newest_read
        assert await feed.read_and_advance() == 8
        assert (feed.revision, feed.loads, feed.restores) == (9, 1, 0)
    finally:
        await feed.stop()
