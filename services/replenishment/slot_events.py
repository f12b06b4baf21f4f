"""The slot feed: what happened to a customer's slots and devices, in revision order.

`append` adds one event in the caller's transaction (the revision's row lock is held to
commit, so readers see revisions in order). Telemetry (LOW, EMPTY, REFILLED), ordering
(ORDER_PLACED, ORDER_SKIPPED, NOTIFICATION, ORDER_CANCELLED/SHIPPED/DELIVERED/REJECTED),
pause/resume and device registration all write through here. ListSlotEvents and
WatchSlotEvents read it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment.feed_follower import PAGE, FeedFollower
from services.replenishment.store import (
    SLOT_FEED,
    allocate_revision,
    current_revision,
    feed_heads,
    slot_events,
)
from shared.db import Database, now_micros
from shared.proto_time import timestamp_of


def append(
    connection: Connection,
    *,
    customer_id: str,
    device_id: str,
    slot_id: str,
    event_type: str,
    now_us: int,
    event_time_us: int | None = None,
    outcome: str | None = None,
    order_id: str | None = None,
    cancellation_reason: str | None = None,
    level: float | None = None,
    message: str = "",
    payload: dict[str, Any] | None = None,
    test: bool = False,
) -> int:
    """Appends one event; returns its revision. event_type is the SlotEventType name
    without its prefix ("LOW", "ORDER_PLACED", ...), outcome the ReplenishOutcome name
    without its prefix ("CONSENT_REQUIRED", ...); slot_id is empty for device-wide events; event_time_us
    is when it happened (a reading's measure time), now_us when it was recorded."""
    revision = allocate_revision(connection, SLOT_FEED)
    connection.execute(
        slot_events.insert().values(
            revision=revision,
            customer_id=customer_id,
            device_id=device_id,
            slot_id=slot_id,
            type=event_type,
            outcome=outcome,
            order_id=order_id,
            cancellation_reason=cancellation_reason,
            level=level,
            message=message[:200],
            payload=json.dumps(payload or {}, sort_keys=True),
            test=test,
            event_time_us=now_us if event_time_us is None else event_time_us,
            create_time_us=now_us,
        )
    )
    return revision


# -- the reading side: ListSlotEvents and WatchSlotEvents ----------------------------------


@dataclass(frozen=True)
class SlotFilter:
    """Which events a reader wants; empty fields match everything."""

    customer_id: str = ""
    device_id: str = ""
    types: frozenset[str] = frozenset()  # SlotEventType names without their prefix

    def as_filters(self) -> dict[str, object]:
        """What a page token is bound to."""
        return {"customer_id": self.customer_id, "device_id": self.device_id, "types": sorted(self.types)}


def _event_message(row: sa.Row) -> pb.SlotEvent:
    return pb.SlotEvent(
        revision=row.revision,
        type=pb.SlotEventType.Value(f"SLOT_EVENT_TYPE_{row.type}"),
        customer_id=row.customer_id,
        device_id=row.device_id,
        slot_id=row.slot_id,
        outcome=pb.ReplenishOutcome.Value(f"REPLENISH_OUTCOME_{row.outcome or 'UNSPECIFIED'}"),
        order_id=row.order_id or "",
        cancellation_reason=pb.CancellationReason.Value(
            f"CANCELLATION_REASON_{row.cancellation_reason or 'UNSPECIFIED'}"
        ),
        level=row.level or 0.0,
        message=row.message,
        event_time=timestamp_of(row.event_time_us),
        test=row.test,
    )


def events_after(
    connection: Connection, since_revision: int, wanted: SlotFilter, limit: int, until: int | None = None
) -> list[pb.SlotEvent]:
    """Up to `limit` events after `since_revision` (up to `until`) matching `wanted`, in
    revision order."""
    query = sa.select(slot_events).where(slot_events.c.revision > since_revision)
    if until is not None:
        query = query.where(slot_events.c.revision <= until)
    if wanted.customer_id:
        query = query.where(slot_events.c.customer_id == wanted.customer_id)
    if wanted.device_id:
        query = query.where(slot_events.c.device_id == wanted.device_id)
    if wanted.types:
        query = query.where(slot_events.c.type.in_(sorted(wanted.types)))
    rows = connection.execute(query.order_by(slot_events.c.revision).limit(limit))
    return [_event_message(row) for row in rows]


def head(connection: Connection) -> int:
    return current_revision(connection, SLOT_FEED)


# feed_heads row holding the highest revision purged (retention), for REVISION_COMPACTED.
# Erasure deletes events too, so the oldest event left does not say what was purged.
PURGED = "slots_purged"


def purged_through(connection: Connection) -> int:
    found = connection.execute(sa.select(feed_heads.c.revision).where(feed_heads.c.feed == PURGED)).scalar()
    return int(found or 0)


def purge_before(connection: Connection, create_time_us: int, limit: int = PAGE) -> int:
    """Deletes up to `limit` of the oldest events created before `create_time_us` (the order
    feed's retention; order_worker.py calls it); returns how many."""
    doomed = list(
        connection.execute(
            sa.select(slot_events.c.revision)
            .where(slot_events.c.create_time_us < create_time_us)
            .order_by(slot_events.c.revision)
            .limit(limit)
        ).scalars()
    )
    if not doomed:
        return 0
    connection.execute(slot_events.delete().where(slot_events.c.revision.in_(doomed)))
    marked = connection.execute(
        feed_heads.update()
        .where(feed_heads.c.feed == PURGED, feed_heads.c.revision < doomed[-1])
        .values(revision=doomed[-1])
    ).rowcount
    if not marked and not purged_through(connection):
        connection.execute(feed_heads.insert().values(feed=PURGED, revision=doomed[-1]))
    return len(doomed)


class SlotFeed(FeedFollower):
    """The slot feed's follower, with the watch stream of WatchSlotEvents."""

    def __init__(self, database: Database, poll_interval: float | None = None):
        super().__init__(database, SLOT_FEED, poll_interval)

    async def watch(
        self, since_revision: int, wanted: SlotFilter, heartbeat_seconds: float
    ) -> AsyncIterator[pb.WatchSlotEventsResponse]:
        """The replay after `since_revision`, a heartbeat, then live events, with a heartbeat
        after every `heartbeat_seconds` of silence; ends (OK) when the server stops."""

        def wanted_after(connection: Connection, after: int, until: int, limit: int) -> list[pb.SlotEvent]:
            return events_after(connection, after, wanted, limit, until)

        stream = self.stream(since_revision, wanted_after, lambda event: event.revision, heartbeat_seconds)
        async for item in stream:
            if isinstance(item, int):
                heartbeat = pb.SlotFeedHeartbeat(current_revision=item, send_time=timestamp_of(now_micros()))
                yield pb.WatchSlotEventsResponse(heartbeat=heartbeat)
            else:
                yield pb.WatchSlotEventsResponse(event=item)
