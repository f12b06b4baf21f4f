"""Follows one feed of feed_heads ('slots' or 'orders') for its watch streams.

The watchers wake (shared/feed_watch.py) at once after this process commits events to the
feed (`poke`: app.py wires the writers to it), and within POLL_SECONDS for other replicas'
commits, which only the poll of the head reveals. A stream that has sent a revision a
restored database undid ends with OUT_OF_RANGE (REVISION_AHEAD), like a watch that starts
ahead of the feed.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from sqlalchemy.engine import Connection

from services.replenishment.store import current_revision
from shared.db import Database
from shared.feed_watch import FeedWatch

PAGE = 1000
E = TypeVar("E")
# Only other replicas' events wait for it: this process pokes its followers after each commit.
POLL_SECONDS = 1.0
# What a watcher whose revision a restored database undid must do (OUT_OF_RANGE, REVISION_AHEAD).
RESTART = "resynchronise (ListOrders, or the list RPC from revision 0) and watch from its revision"


def _page(
    events_after: Callable[[Connection, int, int, int], Sequence[E]],
    after: int,
    until: int,
    connection: Connection,
) -> Sequence[E]:
    return events_after(connection, after, until, PAGE)


class FeedFollower(FeedWatch):
    def __init__(self, database: Database, feed: str, poll_interval: float | None = None):
        super().__init__(feed, POLL_SECONDS if poll_interval is None else poll_interval)
        self.db = database
        self.feed = feed

    async def read_head(self) -> int:
        return await self.db.read(lambda connection: current_revision(connection, self.feed))

    async def stream(
        self,
        since_revision: int,
        events_after: Callable[[Connection, int, int, int], Sequence[E]],
        revision_of: Callable[[E], int],
        heartbeat_seconds: float,
    ) -> AsyncIterator[E | int]:
        """A watch stream's events after `since_revision` (`events_after(connection, after,
        until, limit)`: the wanted ones, oldest first), then live ones; an int is a heartbeat
        (the revision reached): one after the replay, then after every `heartbeat_seconds`
        in which nothing was sent. Ends when the server begins to stop."""
        cursor = since_revision
        replayed = False  # the heartbeat that ends the replay is due
        last_sent = time.monotonic()
        restores = self.restores
        with self.watched():
            while not self.closing:
                # Revisions commit in order: everything up to the head read here is readable.
                current = await self.read_and_advance()
                restores = self.check_watch(cursor, restores, "REVISION_AHEAD", RESTART)
                while cursor < current:
                    page = await self.db.read(functools.partial(_page, events_after, cursor, current))
                    for event in page:
                        yield event
                        last_sent = time.monotonic()
                    cursor = revision_of(page[-1]) if len(page) == PAGE else current
                if not replayed or time.monotonic() - last_sent >= heartbeat_seconds:
                    yield cursor
                    replayed, last_sent = True, time.monotonic()
                await self.wait_beyond(cursor, heartbeat_seconds - (time.monotonic() - last_sent))
