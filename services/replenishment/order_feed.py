"""The order feed: every change of every order, in revision order, for fulfilment.

`append` writes one event in the caller's transaction (orders.py calls it for each
change) with the order as it became, serialized. The revision comes from feed_heads
under its row lock, so revisions commit in order: a reader that saw revision N has seen
every event below it, and a watcher resuming from N misses nothing.

Test orders (of test devices) are in the feed, but service:fulfilment never sees them:
`events_after` leaves them out for every caller but admin (`with_test`).

`OrderFeed` wakes WatchOrderEvents streams: at once after a commit of this process
(`notify`), and by polling the feed head (`POLL_SECONDS`) for other replicas' commits.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment.store import ORDER_FEED, current_revision, order_events
from shared.db import Database, now_micros
from shared.errors import OutOfRange
from shared.proto_time import timestamp_of

POLL_SECONDS = 0.25
PAGE = 1000


def append(
    connection: Connection,
    row: Any,
    order: pb.Order,
    event_type: str,
    previous_state: str | None,
    event_time_us: int,
    now_us: int,
) -> None:
    """Records one change of an order (`row`: the order right after it, its revision taken;
    `order`: its message)."""
    connection.execute(
        order_events.insert().values(
            revision=row.revision,
            order_id=row.order_id,
            customer_id=row.customer_id,
            type=event_type,
            previous_state=previous_state,
            state=row.state,
            test=row.test,
            order_message=order.SerializeToString(),
            event_time_us=event_time_us,
            create_time_us=now_us,
        )
    )


def event_message(row: sa.Row) -> pb.OrderEvent:
    return pb.OrderEvent(
        revision=row.revision,
        type=pb.OrderEventType.Value(f"ORDER_EVENT_TYPE_{row.type}"),  # type: ignore[arg-type]
        order=pb.Order.FromString(row.order_message),
        previous_state=(
            pb.OrderState.Value(f"ORDER_STATE_{row.previous_state}") if row.previous_state else 0  # type: ignore[arg-type]
        ),
        event_time=timestamp_of(row.event_time_us),
    )


def head(connection: Connection) -> int:
    return current_revision(connection, ORDER_FEED)


def check_since(connection: Connection, since_revision: int) -> int:
    """The current revision, once `since_revision` is known to be neither compacted nor ahead."""
    current = head(connection)
    if since_revision > current:
        raise OutOfRange(
            f"since_revision {since_revision} is ahead of the current revision {current}",
            reason="REVISION_AHEAD",
        )
    # 0 means "from the oldest retained event"; a later position must not lie before it.
    oldest = connection.execute(sa.select(sa.func.min(order_events.c.revision))).scalar() or current + 1
    if since_revision and since_revision < oldest - 1:
        raise OutOfRange(
            f"events after {since_revision} are no longer kept (the oldest is {oldest}): "
            "resynchronise with ListOrders and continue from its revision",
            reason="REVISION_COMPACTED",
        )
    return current


def purge_before(connection: Connection, create_time_us: int, limit: int = PAGE) -> int:
    """Deletes up to `limit` of the oldest events created before `create_time_us`; how many."""
    doomed = (
        sa.select(order_events.c.revision)
        .where(order_events.c.create_time_us < create_time_us)
        .order_by(order_events.c.revision)
        .limit(limit)
        .scalar_subquery()
    )
    return int(connection.execute(order_events.delete().where(order_events.c.revision.in_(doomed))).rowcount)


def events_after(
    connection: Connection, since_revision: int, limit: int, with_test: bool, until: int | None = None
) -> list[sa.Row]:
    """Up to `limit` events after `since_revision` (up to `until`), oldest first."""
    query = sa.select(order_events).where(order_events.c.revision > since_revision)
    if until is not None:
        query = query.where(order_events.c.revision <= until)
    if not with_test:
        query = query.where(order_events.c.test == sa.false())
    return list(connection.execute(query.order_by(order_events.c.revision).limit(limit)).all())


class OrderFeed:
    """Wakes the watchers of one process when the order feed moves."""

    def __init__(self, database: Database):
        self.db = database
        self._changed = asyncio.Condition()
        self.closing = False

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def close_watches(self) -> None:
        self.closing = True
        await self.notify()

    async def _wait(self, timeout: float) -> None:
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    async def watch(
        self, since_revision: int, heartbeat_seconds: float, with_test: bool
    ) -> AsyncIterator[pb.WatchOrderEventsResponse]:
        """The replay after `since_revision`, a heartbeat, then live events, with a heartbeat
        after every `heartbeat_seconds` of silence."""
        cursor = since_revision
        await self.db.read(lambda connection: check_since(connection, since_revision))
        first = True
        last_sent = time.monotonic()
        while not self.closing:
            current = await self.db.read(head)
            while cursor < current:
                found = await self.db.read(
                    functools.partial(
                        events_after, since_revision=cursor, limit=PAGE, with_test=with_test, until=current
                    )
                )
                for row in found:
                    yield pb.WatchOrderEventsResponse(event=event_message(row))
                    last_sent = time.monotonic()
                cursor = found[-1].revision if len(found) == PAGE else current
            if first or time.monotonic() - last_sent >= heartbeat_seconds:
                yield pb.WatchOrderEventsResponse(
                    heartbeat=pb.OrderFeedHeartbeat(
                        current_revision=cursor, send_time=timestamp_of(now_micros())
                    )
                )
                last_sent = time.monotonic()
                first = False
            remaining = heartbeat_seconds - (time.monotonic() - last_sent)
            await self._wait(max(0.0, min(POLL_SECONDS, remaining)))
