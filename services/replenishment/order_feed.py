"""The order feed: every change of every order, in revision order, for fulfilment.

`append` writes one event in the caller's transaction (orders.py calls it for each
change) with the order as it became, serialized. The revision comes from feed_heads
under its row lock, so revisions commit in order: a reader that saw revision N has seen
every event below it, and a watcher resuming from N misses nothing.

Test orders (of test devices) are in the feed, but service:fulfilment never sees them:
`events_after` leaves them out for every caller but admin (`with_test`).

`OrderFeed` wakes WatchOrderEvents streams (feed_follower.py): at once after a commit of
this process (`notify`), and by polling the feed head (`POLL_SECONDS`) for other replicas'
commits.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment.feed_follower import PAGE, FeedFollower
from services.replenishment.store import ORDER_FEED, current_revision, order_events
from shared.db import Database, now_micros
from shared.errors import OutOfRange
from shared.feed_watch import FeedWatch
from shared.proto_time import timestamp_of


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


class OrderFeed(FeedFollower):
    """The order feed's follower, with the watch stream of WatchOrderEvents."""

    def __init__(self, database: Database, slot_feed: FeedWatch, poll_interval: float | None = None):
        super().__init__(database, ORDER_FEED, poll_interval)
        self.slot_feed = slot_feed

    async def notify(self) -> None:
        """Call after a commit of this process that may have changed orders: wakes the watchers
        of this feed and of the slot feed (order changes come with slot events, orders.py;
        so do the decisions that call it through Ordering.placed)."""
        self.poke()
        self.slot_feed.poke()

    async def watch(
        self, since_revision: int, heartbeat_seconds: float, with_test: bool
    ) -> AsyncIterator[pb.WatchOrderEventsResponse]:
        """The replay after `since_revision`, a heartbeat, then live events, with a heartbeat
        after every `heartbeat_seconds` of silence."""
        await self.db.read(lambda connection: check_since(connection, since_revision))

        def rows_after(connection: Connection, after: int, until: int, limit: int) -> list[sa.Row]:
            return events_after(connection, after, limit, with_test, until)

        async for item in self.stream(
            since_revision, rows_after, lambda row: row.revision, heartbeat_seconds
        ):
            if isinstance(item, int):
                heartbeat = pb.OrderFeedHeartbeat(current_revision=item, send_time=timestamp_of(now_micros()))
                yield pb.WatchOrderEventsResponse(heartbeat=heartbeat)
            else:
                yield pb.WatchOrderEventsResponse(event=event_message(item))
