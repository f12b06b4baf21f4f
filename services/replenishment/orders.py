"""The order life cycle: creation, cancellation, PENDING -> PLACED promotion, Ship/Deliver/Reject.

Every function runs in the caller's write transaction. Each change of an order is a
conditional UPDATE on the state it was read in (`WHERE state = <read state>`), so two
replicas (or a retry racing the promotion worker) never apply one transition twice:
the loser updates no row and re-reads. Each change takes the next order-feed revision
and writes one order event (order_feed.py) holding the order as it became, and, while
the slot still exists, an ORDER_* slot event (slot_events.py).

Transitions (README, "Orders"):
- PENDING -> PLACED when the cancellation window closes (`promote_due`, by the worker in
  order_worker.py, also right after a restart: the state is in the database);
- PENDING -> CANCELLED (CancelOrder in the window; withdrawn consent; policy change,
  slot deletion, deregistration, erasure); admin may also cancel PLACED;
- PLACED -> SHIPPED (tracking; SHIPPED -> SHIPPED updates tracking), PLACED/SHIPPED ->
  DELIVERED (the slot's expected stock is restored: a new consumption epoch),
  PLACED/SHIPPED -> REJECTED. Anything else is FAILED_PRECONDITION
  INVALID_ORDER_TRANSITION with the current state.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment import order_feed, slot_events
from services.replenishment.store import (
    OPEN_ORDER_STATES,
    ORDER_FEED,
    allocate_revision,
    order_events,
    orders,
    slots,
)
from shared.errors import FailedPrecondition, NotFound
from shared.proto_time import timestamp_of

PENDING, PLACED, SHIPPED, DELIVERED, CANCELLED, REJECTED = (
    "PENDING",
    "PLACED",
    "SHIPPED",
    "DELIVERED",
    "CANCELLED",
    "REJECTED",
)
AUTOMATIC, DEVICE_REQUEST, CUSTOMER = "AUTOMATIC", "DEVICE_REQUEST", "CUSTOMER"
# Orders the automatic-ordering consent covers (a CUSTOMER order is an explicit purchase).
CONSENTED_TRIGGERS = (AUTOMATIC, DEVICE_REQUEST)


def state_value(name: str) -> int:
    return pb.OrderState.Value(f"ORDER_STATE_{name}")


def state_name(value: int) -> str:
    return pb.OrderState.Name(value).removeprefix("ORDER_STATE_")  # type: ignore[arg-type]


def trigger_name(value: int) -> str:
    return pb.OrderTrigger.Name(value).removeprefix("ORDER_TRIGGER_")  # type: ignore[arg-type]


def new_order_id() -> str:
    return "ord_" + secrets.token_hex(16)


def _enum(enum: Any, prefix: str, name: str | None) -> int:
    return enum.Value(prefix + name) if name else 0


def order_message(row: Any) -> pb.Order:
    """The Order of an `orders` row (or of a mapping with its columns)."""
    tracking = None
    if row.carrier is not None:
        tracking = pb.ShipmentTracking(
            carrier=row.carrier,
            tracking_number=row.tracking_number or "",
            tracking_url=row.tracking_url or "",
            estimated_delivery_time=timestamp_of(row.estimated_delivery_time_us),
        )
    return pb.Order(
        order_id=row.order_id,
        device_id=row.device_id,
        slot_id=row.slot_id,
        customer_id=row.customer_id,
        item_id=row.item_id,
        quantity=row.quantity,
        unit_price_micros=row.unit_price_micros,
        total_price_micros=row.total_price_micros,
        currency_code=row.currency_code,
        state=state_value(row.state),  # type: ignore[arg-type]
        trigger=_enum(pb.OrderTrigger, "ORDER_TRIGGER_", row.order_trigger),  # type: ignore[arg-type]
        cancel_deadline_time=timestamp_of(row.pending_until_us),
        cancellation_reason=_enum(  # type: ignore[arg-type]
            pb.CancellationReason, "CANCELLATION_REASON_", row.cancellation_reason
        ),
        cancellation_note=row.cancellation_note or "",
        tracking=tracking,
        expected_delivery_time=timestamp_of(row.estimated_delivery_time_us or row.expected_delivery_time_us),
        create_time=timestamp_of(row.create_time_us),
        update_time=timestamp_of(row.update_time_us),
        place_time=timestamp_of(row.place_time_us),
        ship_time=timestamp_of(row.ship_time_us),
        deliver_time=timestamp_of(row.deliver_time_us),
        cancel_time=timestamp_of(row.cancel_time_us),
        revision=row.revision,
        test=row.test,
        rejection_reason=_enum(  # type: ignore[arg-type]
            pb.RejectionReason, "REJECTION_REASON_", row.rejection_reason
        ),
        reject_time=timestamp_of(row.reject_time_us),
        rejection_note=row.rejection_note or "",
    )


def load(connection: Connection, order_id: str) -> sa.Row:
    row = connection.execute(sa.select(orders).where(orders.c.order_id == order_id)).first()
    if row is None:
        raise NotFound(f"order {order_id} does not exist", reason="ORDER_NOT_FOUND")
    return row


def open_order(connection: Connection, device_id: str, slot_id: str) -> sa.Row | None:
    return connection.execute(
        sa.select(orders).where(
            orders.c.device_id == device_id,
            orders.c.slot_id == slot_id,
            orders.c.state.in_(OPEN_ORDER_STATES),
        )
    ).first()


@dataclass(frozen=True)
class NewOrder:
    device_id: str
    slot_id: str
    customer_id: str
    item_id: str
    quantity: int
    unit_price_micros: int
    currency_code: str
    trigger: str
    test: bool
    request_id: str
    pending_until_us: int
    expected_delivery_time_us: int


def create(connection: Connection, new: NewOrder, now_us: int, *, level: float | None) -> sa.Row:
    """Inserts one PENDING order. A second open order of the slot violates the partial unique
    index orders_one_open_per_slot: the IntegrityError makes Database.write run the whole
    transaction again, where the caller finds the winner's open order."""
    order_id = new_order_id()
    connection.execute(
        orders.insert().values(
            order_id=order_id,
            device_id=new.device_id,
            slot_id=new.slot_id,
            customer_id=new.customer_id,
            item_id=new.item_id,
            quantity=new.quantity,
            unit_price_micros=new.unit_price_micros,
            total_price_micros=new.quantity * new.unit_price_micros,
            currency_code=new.currency_code,
            state=PENDING,
            order_trigger=new.trigger,
            test=new.test,
            request_id=new.request_id or None,
            pending_until_us=new.pending_until_us,
            expected_delivery_time_us=new.expected_delivery_time_us,
            create_time_us=now_us,
            update_time_us=now_us,
            revision=0,  # set below, once the row (and its slot's unique entry) is ours
        )
    )
    revision = allocate_revision(connection, ORDER_FEED)
    connection.execute(orders.update().where(orders.c.order_id == order_id).values(revision=revision))
    row = load(connection, order_id)
    order_feed.append(connection, row, order_message(row), "CREATED", None, now_us, now_us)
    _slot_event(connection, row, "ORDER_PLACED", now_us, outcome="ORDER_PLACED", level=level)
    return row


def _slot_event(connection: Connection, row: sa.Row, event_type: str, now_us: int, **fields: Any) -> None:
    """An ORDER_* slot event, while the order's slot exists (its device may have been erased)."""
    exists = connection.execute(
        sa.select(slots.c.slot_id).where(slots.c.device_id == row.device_id, slots.c.slot_id == row.slot_id)
    ).first()
    if exists is None:
        return
    slot_events.append(
        connection,
        customer_id=row.customer_id,
        device_id=row.device_id,
        slot_id=row.slot_id,
        event_type=event_type,
        now_us=now_us,
        order_id=row.order_id,
        test=row.test,
        **fields,
    )


def invalid_transition(row: sa.Row, action: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"order {row.order_id} is {row.state}: it cannot be {action}",
        reason="INVALID_ORDER_TRANSITION",
        metadata={"state": row.state},
    )


def _change(
    connection: Connection,
    row: sa.Row,
    values: dict[str, Any],
    now_us: int,
    event_time_us: int,
    event_type: str = "STATE_CHANGED",
) -> sa.Row | None:
    """Applies `values` if the order is still in the state it was read in; None if it moved."""
    changed = connection.execute(
        orders.update()
        .where(orders.c.order_id == row.order_id, orders.c.state == row.state)
        .values(update_time_us=now_us, **values)
    ).rowcount
    if not changed:
        return None
    revision = allocate_revision(connection, ORDER_FEED)
    connection.execute(orders.update().where(orders.c.order_id == row.order_id).values(revision=revision))
    after = load(connection, row.order_id)
    previous = row.state if event_type == "STATE_CHANGED" else None
    order_feed.append(connection, after, order_message(after), event_type, previous, event_time_us, now_us)
    return after


def cancel(
    connection: Connection,
    row: sa.Row,
    reason: str,
    now_us: int,
    note: str = "",
    *,
    from_placed: bool = False,
) -> sa.Row | None:
    """Cancels a PENDING order (or a PLACED one, `from_placed`, for admin); None if it moved on."""
    allowed = (PENDING, PLACED) if from_placed else (PENDING,)
    if row.state not in allowed:
        return None
    after = _change(
        connection,
        row,
        dict(
            state=CANCELLED, cancellation_reason=reason, cancellation_note=note or None, cancel_time_us=now_us
        ),
        now_us,
        now_us,
    )
    if after is not None:
        _slot_event(connection, after, "ORDER_CANCELLED", now_us, cancellation_reason=reason)
    return after


def cancel_pending_of_slot(
    connection: Connection,
    device_id: str,
    slot_id: str | None,
    reason: str,
    now_us: int,
    triggers: tuple[str, ...] = (AUTOMATIC, DEVICE_REQUEST, CUSTOMER),
) -> list[str]:
    """Cancels the PENDING orders (of these triggers) of a slot, or, slot_id None, of every
    slot of a device: UpdateSlot away from AUTO (POLICY_CHANGED, the service's and the
    device's orders only), DeleteSlot (SLOT_DELETED), DeregisterDevice (DEVICE_DEREGISTERED).
    Returns the ids cancelled."""
    query = sa.select(orders).where(
        orders.c.device_id == device_id, orders.c.state == PENDING, orders.c.order_trigger.in_(triggers)
    )
    if slot_id is not None:
        query = query.where(orders.c.slot_id == slot_id)
    cancelled = []
    for row in connection.execute(query.order_by(orders.c.order_id)).all():
        if cancel(connection, row, reason, now_us) is not None:
            cancelled.append(row.order_id)
    return cancelled


def promote(connection: Connection, row: sa.Row, now_us: int) -> sa.Row | None:
    """PENDING -> PLACED once the window closed; None if another worker (or a cancel) was first."""
    if row.state != PENDING or row.pending_until_us > now_us:
        return None
    return _change(connection, row, dict(state=PLACED, place_time_us=now_us), now_us, now_us)


def due_for_promotion(connection: Connection, now_us: int, limit: int) -> list[sa.Row]:
    return list(
        connection.execute(
            sa.select(orders)
            .where(orders.c.state == PENDING, orders.c.pending_until_us <= now_us)
            .order_by(orders.c.pending_until_us, orders.c.order_id)
            .limit(limit)
        ).all()
    )


def pending_consented(connection: Connection) -> list[sa.Row]:
    """Every PENDING order that depends on the automatic-ordering consent."""
    return list(
        connection.execute(
            sa.select(orders).where(orders.c.state == PENDING, orders.c.order_trigger.in_(CONSENTED_TRIGGERS))
        ).all()
    )


def ship(
    connection: Connection, row: sa.Row, tracking: dict[str, Any], event_time_us: int, now_us: int
) -> sa.Row:
    if row.state == PLACED:
        after = _change(
            connection,
            row,
            dict(state=SHIPPED, ship_time_us=event_time_us, **tracking),
            now_us,
            event_time_us,
        )
        event = "ORDER_SHIPPED"
    elif row.state == SHIPPED:
        after = _change(connection, row, tracking, now_us, event_time_us, "TRACKING_UPDATED")
        event = ""
    else:
        raise invalid_transition(row, "shipped")
    if after is None:
        return ship(connection, load(connection, row.order_id), tracking, event_time_us, now_us)
    if event:
        _slot_event(connection, after, event, now_us, event_time_us=event_time_us)
    return after


def deliver(connection: Connection, row: sa.Row, event_time_us: int, now_us: int) -> sa.Row:
    if row.state == DELIVERED:
        return row
    if row.state not in (PLACED, SHIPPED):
        raise invalid_transition(row, "delivered")
    after = _change(
        connection, row, dict(state=DELIVERED, deliver_time_us=event_time_us), now_us, event_time_us
    )
    if after is None:
        return deliver(connection, load(connection, row.order_id), event_time_us, now_us)
    level = _restore_stock(connection, after, event_time_us)
    _slot_event(connection, after, "ORDER_DELIVERED", now_us, event_time_us=event_time_us, level=level)
    if level is not None:
        _slot_event(connection, after, "REFILLED", now_us, event_time_us=event_time_us, level=level)
    return after


def _restore_stock(connection: Connection, row: sa.Row, event_time_us: int) -> float | None:
    """The delivered order's slot now holds its expected stock after delivery (capacity when
    0), from the delivery time: a new consumption epoch, until a reading says otherwise.
    A reading measured after the delivery already says so: the level is then left alone."""
    slot = connection.execute(
        sa.select(slots).where(slots.c.device_id == row.device_id, slots.c.slot_id == row.slot_id)
    ).first()
    if slot is None:
        return None
    level = slot.expected_stock_after_delivery or slot.capacity
    if slot.level_time_us is not None and slot.level_time_us > event_time_us:
        return None
    connection.execute(
        slots.update()
        .where(slots.c.device_id == row.device_id, slots.c.slot_id == row.slot_id)
        .values(
            level=level,
            level_time_us=event_time_us,
            level_source="DELIVERY",
            epoch=slots.c.epoch + 1,
            epoch_start_time_us=event_time_us,
        )
    )
    return float(level)


def reject(
    connection: Connection, row: sa.Row, reason: str, note: str, event_time_us: int, now_us: int
) -> sa.Row:
    if row.state == REJECTED:
        return row
    if row.state not in (PLACED, SHIPPED):
        raise invalid_transition(row, "rejected")
    after = _change(
        connection,
        row,
        dict(
            state=REJECTED, rejection_reason=reason, rejection_note=note or None, reject_time_us=event_time_us
        ),
        now_us,
        event_time_us,
    )
    if after is None:
        return reject(connection, load(connection, row.order_id), reason, note, event_time_us, now_us)
    _slot_event(connection, after, "ORDER_REJECTED", now_us, event_time_us=event_time_us)
    return after


# -- data-subject requests ----------------------------------------------------------------------

ERASED_PREFIX = "erased:"


def customer_orders(connection: Connection, customer_id: str) -> list[pb.Order]:
    """The customer's orders, oldest first (for an export)."""
    rows = connection.execute(
        sa.select(orders)
        .where(orders.c.customer_id == customer_id)
        .order_by(orders.c.create_time_us, orders.c.order_id)
    )
    return [order_message(row) for row in rows]


def pseudonymise_customer(
    connection: Connection, customer_id: str, pseudonym: str, now_us: int
) -> dict[str, int]:
    """Erasure: the customer's PENDING orders are cancelled (CUSTOMER_ERASED); every order and
    order event is kept for accounting with customer_id replaced by "erased:<pseudonym>" (the
    serialized order in each event too). Run it before the slot feed is erased: the
    cancellations' slot events name the customer."""
    cancelled = 0
    pending = connection.execute(
        sa.select(orders).where(orders.c.customer_id == customer_id, orders.c.state == PENDING)
    ).all()
    for row in pending:
        if cancel(connection, row, "CUSTOMER_ERASED", now_us) is not None:
            cancelled += 1
    replacement = ERASED_PREFIX + pseudonym
    kept = connection.execute(
        orders.update().where(orders.c.customer_id == customer_id).values(customer_id=replacement)
    ).rowcount
    events = connection.execute(
        sa.select(order_events.c.revision, order_events.c.order_message).where(
            order_events.c.customer_id == customer_id
        )
    ).all()
    for event in events:
        order = pb.Order.FromString(event.order_message)
        order.customer_id = replacement
        connection.execute(
            order_events.update()
            .where(order_events.c.revision == event.revision)
            .values(customer_id=replacement, order_message=order.SerializeToString())
        )
    return {
        "orders_cancelled": cancelled,
        "orders_pseudonymised": kept,
        "order_events_pseudonymised": len(events),
    }
