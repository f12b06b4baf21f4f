"""The slot feed: what happened to a customer's slots and devices, in revision order.

`append` adds one event in the caller's transaction (the revision's row lock is held to
commit, so readers see revisions in order). Telemetry (LOW, EMPTY, REFILLED), ordering
(ORDER_PLACED, ORDER_SKIPPED, NOTIFICATION, ORDER_CANCELLED/SHIPPED/DELIVERED/REJECTED),
pause/resume and device registration all write through here. ListSlotEvents and
WatchSlotEvents read it.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.engine import Connection

from services.replenishment.store import allocate_revision, slot_events

SLOT_FEED = "slots"


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
