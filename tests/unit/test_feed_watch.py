"""shared/feed_watch.py: pokes wake the watchers at once, with one read of the head for all
of them, and none while nobody watches."""

from __future__ import annotations

import asyncio

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
