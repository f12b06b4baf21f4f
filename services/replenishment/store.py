"""The replenishment service's tables and queries (SQLAlchemy Core)."""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.replenishment.devices import Device, DeviceState, Registration
from services.replenishment.slots import Slot, SlotLimits, SlotOrders, SlotPolicy, SlotSettings, SlotState
from shared.db import Database, now_micros
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from shared.idempotency import Idempotency, StoredReply

metadata = sa.MetaData()

ACTIVE = DeviceState.ACTIVE.value

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("manufacturer", sa.String(64), nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(64), nullable=False),
    sa.Column("serial_number", sa.String(128), nullable=False),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("firmware_version", sa.String(64), nullable=False),
    sa.Column("attributes", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=True),
    sa.Column("token_create_time_us", sa.BigInteger, nullable=False),
    sa.Column("last_seen_time_us", sa.BigInteger, nullable=True),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("deregister_time_us", sa.BigInteger, nullable=True),
    # Migration 0004:
    sa.Column("test", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("previous_token_hash", sa.String(64), nullable=True),
    sa.Column("previous_token_expire_time_us", sa.BigInteger, nullable=True),
)

slots = sa.Table(
    "slots",
    metadata,
    sa.Column("device_id", sa.String(64), sa.ForeignKey("devices.device_id"), primary_key=True),
    sa.Column("slot_id", sa.String(64), primary_key=True),
    sa.Column("display_name", sa.String(200), nullable=False),
    sa.Column("item_id", sa.String(128), nullable=False),
    sa.Column("capacity", sa.Double, nullable=False),
    sa.Column("unit", sa.String(16), nullable=False),
    sa.Column("reorder_quantity", sa.Integer, nullable=False),
    sa.Column("unit_price_micros", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), nullable=False),
    sa.Column("policy", sa.String(16), nullable=False),
    sa.Column("lead_time_us", sa.BigInteger, nullable=False),
    sa.Column("service_level", sa.Double, nullable=False),
    sa.Column("fallback_reorder_level", sa.Double, nullable=False),
    sa.Column("max_orders_per_period", sa.Integer, nullable=False),
    sa.Column("limit_period_us", sa.BigInteger, nullable=False),
    sa.Column("max_spend_micros", sa.BigInteger, nullable=False),
    sa.Column("limit_currency_code", sa.String(3), nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    # Migration 0004: pause, the expected stock after a delivery, and the service's view of
    # the slot: the latest level by measure_time (source READING or DELIVERY), the
    # consumption epoch (a refill or delivery starts the next), the latest decision (a
    # ReplenishOutcome name; slot events on change only) and when a deferred one is due.
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("expected_stock_after_delivery", sa.Double, nullable=False, server_default="0"),
    sa.Column("level", sa.Double, nullable=True),
    sa.Column("level_time_us", sa.BigInteger, nullable=True),
    sa.Column("level_source", sa.String(16), nullable=True),
    sa.Column("epoch", sa.Integer, nullable=False, server_default="0"),
    sa.Column("epoch_start_time_us", sa.BigInteger, nullable=True),
    sa.Column("last_refill_time_us", sa.BigInteger, nullable=True),
    sa.Column("last_outcome", sa.String(32), nullable=True),
    sa.Column("last_outcome_time_us", sa.BigInteger, nullable=True),
    sa.Column("decision_due_time_us", sa.BigInteger, nullable=True),
    # Migration 0005: the reorder point of the latest forecast with a rate (NULL: the fallback).
    sa.Column("reorder_point", sa.Double, nullable=True),
    # Migration 0006: random, new at every write of the slot's readings (epoch_series.py).
    sa.Column("readings_revision", sa.BigInteger, nullable=True),
)

# Every accepted reading; the primary key makes telemetry idempotent by reading_id.
readings = sa.Table(
    "readings",
    metadata,
    sa.Column("device_id", sa.String(64), primary_key=True),
    sa.Column("reading_id", sa.String(64), primary_key=True),
    sa.Column("slot_id", sa.String(64), nullable=False),
    sa.Column("level", sa.Double, nullable=False),
    sa.Column("measure_time_us", sa.BigInteger, nullable=False),
    sa.Column("receive_time_us", sa.BigInteger, nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("refill", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("readings_by_slot", "device_id", "slot_id", "measure_time_us"),
)

# The head revision of each feed ('orders', 'slots'): allocate under its row lock, so
# revisions commit in order (as services/consent/store.py allocate_revision).
feed_heads = sa.Table(
    "feed_heads",
    metadata,
    sa.Column("feed", sa.String(16), primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
)
ORDER_FEED = "orders"
SLOT_FEED = "slots"

OPEN_ORDER_STATES = ("PENDING", "PLACED", "SHIPPED")
_OPEN = sa.text("state IN ('PENDING', 'PLACED', 'SHIPPED')")
_PENDING = sa.text("state = 'PENDING'")

# No foreign key to devices or slots: orders outlive both. Erasure pseudonymises customer_id.
orders = sa.Table(
    "orders",
    metadata,
    sa.Column("order_id", sa.String(64), primary_key=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("slot_id", sa.String(64), nullable=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("item_id", sa.String(128), nullable=False),
    sa.Column("quantity", sa.Integer, nullable=False),
    sa.Column("unit_price_micros", sa.BigInteger, nullable=False),
    sa.Column("total_price_micros", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("order_trigger", sa.String(16), nullable=False),
    sa.Column("test", sa.Boolean, nullable=False),
    sa.Column("request_id", sa.String(64), nullable=True),
    sa.Column("pending_until_us", sa.BigInteger, nullable=False),
    sa.Column("cancellation_reason", sa.String(32), nullable=True),
    sa.Column("cancellation_note", sa.String(500), nullable=True),
    sa.Column("rejection_reason", sa.String(32), nullable=True),
    sa.Column("rejection_note", sa.String(500), nullable=True),
    sa.Column("carrier", sa.String(64), nullable=True),
    sa.Column("tracking_number", sa.String(128), nullable=True),
    sa.Column("tracking_url", sa.String(2048), nullable=True),
    sa.Column("estimated_delivery_time_us", sa.BigInteger, nullable=True),
    sa.Column("expected_delivery_time_us", sa.BigInteger, nullable=True),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("place_time_us", sa.BigInteger, nullable=True),
    sa.Column("ship_time_us", sa.BigInteger, nullable=True),
    sa.Column("deliver_time_us", sa.BigInteger, nullable=True),
    sa.Column("cancel_time_us", sa.BigInteger, nullable=True),
    sa.Column("reject_time_us", sa.BigInteger, nullable=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # Exactly once: at most one open order per slot (an IntegrityError on a race).
    sa.Index(
        "orders_one_open_per_slot",
        "device_id",
        "slot_id",
        unique=True,
        sqlite_where=_OPEN,
        postgresql_where=_OPEN,
    ),
    sa.Index("orders_pending_until", "pending_until_us", sqlite_where=_PENDING, postgresql_where=_PENDING),
    sa.Index("orders_by_slot", "device_id", "slot_id", "create_time_us"),
    sa.Index("orders_by_customer", "customer_id", "create_time_us"),
)

order_events = sa.Table(
    "order_events",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("type", sa.String(24), nullable=False),
    sa.Column("previous_state", sa.String(16), nullable=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("test", sa.Boolean, nullable=False),
    sa.Column("order_message", sa.LargeBinary, nullable=False),
    sa.Column("event_time_us", sa.BigInteger, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Index("order_events_by_order", "order_id"),
    sa.Index("order_events_by_customer", "customer_id"),
    sa.Index("order_events_by_age", "create_time_us"),
)

slot_events = sa.Table(
    "slot_events",
    metadata,
    sa.Column("revision", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("customer_id", sa.String(128), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("slot_id", sa.String(64), nullable=False),
    sa.Column("type", sa.String(24), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=True),
    sa.Column("order_id", sa.String(64), nullable=True),
    sa.Column("cancellation_reason", sa.String(32), nullable=True),
    sa.Column("level", sa.Double, nullable=True),
    sa.Column("message", sa.String(200), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("test", sa.Boolean, nullable=False),
    sa.Column("event_time_us", sa.BigInteger, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Index("slot_events_by_customer", "customer_id", "revision"),
    sa.Index("slot_events_by_device", "device_id", "revision"),
    sa.Index("slot_events_by_age", "create_time_us"),
)


class DriverRows:
    """The rows a driver_sql query returned, fetched at once: tuples that read by column
    name too (named tuples, one class per column list)."""

    def __init__(self, rows: list[Any]):
        self.rows = rows

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def all(self) -> list[Any]:
        return self.rows


@functools.lru_cache(maxsize=256)
def _row_class(names: tuple[str, ...]) -> Any:
    return collections.namedtuple("DriverRow", names, rename=True)  # type: ignore[misc]


def driver_sql(connection: Connection, sql: str, parameters: Any) -> DriverRows:
    """Runs `sql` ("?" placeholders; "%s" for psycopg) on the driver's cursor in the caller's
    transaction: for the telemetry hot path, where SQLAlchemy's statement and result
    handling (even exec_driver_sql's) cost several times the database's work. A list of
    parameter tuples runs the statement once for each (executemany)."""
    if connection.dialect.name == "postgresql":
        sql = sql.replace("?", "%s")
    cursor = connection.connection.cursor()
    try:
        if isinstance(parameters, list):
            cursor.executemany(sql, parameters)
            return DriverRows([])
        cursor.execute(sql, parameters)
        if cursor.description is None:
            return DriverRows([])
        make = _row_class(tuple(column[0] for column in cursor.description))._make
        return DriverRows([make(row) for row in cursor.fetchall()])
    finally:
        cursor.close()


def allocate_revision(connection: Connection, feed: str) -> int:
    """The next revision of `feed` ('orders' or 'slots'). The row lock it takes is held to
    commit, so revisions commit in order: a reader that saw N saw everything below it."""
    connection.execute(
        feed_heads.update().where(feed_heads.c.feed == feed).values(revision=feed_heads.c.revision + 1)
    )
    return current_revision(connection, feed)


def current_revision(connection: Connection, feed: str) -> int:
    return int(
        connection.execute(sa.select(feed_heads.c.revision).where(feed_heads.c.feed == feed)).scalar_one()
    )


def _slot_row(device_id: str, settings: SlotSettings, now: int) -> dict[str, object]:
    assert settings.policy is not None and settings.lead_time_us is not None
    assert settings.limits.period_us is not None
    return dict(
        device_id=device_id,
        slot_id=settings.slot_id,
        display_name=settings.display_name,
        item_id=settings.item_id,
        capacity=settings.capacity,
        unit=settings.unit,
        reorder_quantity=settings.reorder_quantity,
        unit_price_micros=settings.unit_price_micros,
        currency_code=settings.currency_code,
        policy=settings.policy.value,
        lead_time_us=settings.lead_time_us,
        service_level=settings.service_level,
        fallback_reorder_level=settings.fallback_reorder_level,
        max_orders_per_period=settings.limits.max_orders_per_period,
        limit_period_us=settings.limits.period_us,
        max_spend_micros=settings.limits.max_spend_micros,
        limit_currency_code=settings.limits.currency_code,
        expected_stock_after_delivery=settings.expected_stock_after_delivery,
        create_time_us=now,
        update_time_us=now,
    )


def _slot(row: sa.Row) -> Slot:
    settings = SlotSettings(
        slot_id=row.slot_id,
        display_name=row.display_name,
        item_id=row.item_id,
        capacity=row.capacity,
        unit=row.unit,
        reorder_quantity=row.reorder_quantity,
        unit_price_micros=row.unit_price_micros,
        currency_code=row.currency_code,
        policy=SlotPolicy(row.policy),
        lead_time_us=row.lead_time_us,
        service_level=row.service_level,
        fallback_reorder_level=row.fallback_reorder_level,
        limits=SlotLimits(
            max_orders_per_period=row.max_orders_per_period,
            period_us=row.limit_period_us,
            max_spend_micros=row.max_spend_micros,
            currency_code=row.limit_currency_code,
        ),
        expected_stock_after_delivery=row.expected_stock_after_delivery,
    )
    state = SlotState(
        level=row.level,
        level_time_us=row.level_time_us,
        epoch=row.epoch,
        epoch_start_time_us=row.epoch_start_time_us,
        last_refill_time_us=row.last_refill_time_us,
        last_outcome=row.last_outcome,
        reorder_point=row.reorder_point,
    )
    return Slot(row.device_id, settings, row.create_time_us, row.update_time_us, row.paused, state)


def _device(row: sa.Row, device_slots: tuple[Slot, ...]) -> Device:
    return Device(
        device_id=row.device_id,
        customer_id=row.customer_id,
        manufacturer=row.manufacturer,
        model=row.model,
        kind=row.kind,
        serial_number=row.serial_number,
        display_name=row.display_name,
        firmware_version=row.firmware_version,
        attributes=json.loads(row.attributes),
        state=DeviceState(row.state),
        slots=device_slots,
        create_time_us=row.create_time_us,
        update_time_us=row.update_time_us,
        deregister_time_us=row.deregister_time_us,
        token_create_time_us=row.token_create_time_us,
        last_seen_time_us=row.last_seen_time_us,
        test=row.test,
        paused=row.paused,
    )


def device_not_found(device_id: str) -> NotFound:
    return NotFound(f"device {device_id} does not exist", reason="DEVICE_NOT_FOUND")


def slot_not_found(device_id: str, slot_id: str) -> NotFound:
    return NotFound(f"device {device_id} has no slot {slot_id}", reason="SLOT_NOT_FOUND")


def device_deregistered(device_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"device {device_id} is deregistered", reason="DEVICE_DEREGISTERED")


def with_orders(connection: Connection, found: list[Slot]) -> list[Slot]:
    """The slots with their open order and the orders and spend of their limit period."""
    if not found:
        return found
    device_ids = sorted({slot.device_id for slot in found})
    key = (orders.c.device_id, orders.c.slot_id)
    open_ids = {
        (row.device_id, row.slot_id): row.order_id
        for row in connection.execute(
            sa.select(*key, orders.c.order_id).where(
                orders.c.device_id.in_(device_ids), orders.c.state.in_(OPEN_ORDER_STATES)
            )
        )
    }
    same_slot = sa.and_(orders.c.device_id == slots.c.device_id, orders.c.slot_id == slots.c.slot_id)
    usage = {
        (row.device_id, row.slot_id): (int(row.orders), int(row.spend or 0))
        for row in connection.execute(
            sa.select(
                *key,
                sa.func.count().label("orders"),
                sa.func.sum(orders.c.total_price_micros).label("spend"),
            )
            .select_from(orders.join(slots, same_slot))
            .where(
                orders.c.device_id.in_(device_ids),
                orders.c.state != "CANCELLED",
                orders.c.create_time_us > now_micros() - slots.c.limit_period_us,
            )
            .group_by(*key)
        )
    }
    return [
        dataclasses.replace(
            slot,
            orders=SlotOrders(
                open_ids.get((slot.device_id, slot.settings.slot_id), ""),
                *usage.get((slot.device_id, slot.settings.slot_id), (0, 0)),
            ),
        )
        for slot in found
    ]


def load_device(connection: Connection, device_id: str) -> Device:
    row = connection.execute(sa.select(devices).where(devices.c.device_id == device_id)).first()
    if row is None:
        raise device_not_found(device_id)
    found = connection.execute(
        sa.select(slots).where(slots.c.device_id == device_id).order_by(slots.c.slot_id)
    )
    return _device(row, tuple(with_orders(connection, [_slot(slot) for slot in found])))


def active_device(connection: Connection, device_id: str) -> Device:
    """The device, if it exists (NOT_FOUND) and is active (FAILED_PRECONDITION)."""
    device = load_device(connection, device_id)
    if device.state is not DeviceState.ACTIVE:
        raise device_deregistered(device_id)
    return device


def slot_of(device: Device, slot_id: str) -> Slot:
    for slot in device.slots:
        if slot.settings.slot_id == slot_id:
            return slot
    raise slot_not_found(device.device_id, slot_id)


_BY_TOKEN_HASH = "SELECT device_id, token_hash FROM devices WHERE token_hash = ? AND state = 'ACTIVE'"  # noqa: S105
_BY_PREVIOUS_HASH = (
    "SELECT device_id, previous_token_hash FROM devices WHERE previous_token_hash = ? "
    "AND previous_token_expire_time_us > ? AND state = 'ACTIVE'"
)


class ReplenishmentStore:
    def __init__(self, database: Database, idempotency: Idempotency):
        self.db = database
        self.idempotency = idempotency

    async def once(
        self,
        principal: str,
        rpc: str,
        request: Message,
        carry_out: Callable[[Connection], bytes],
        customer_id: str | None = None,
    ) -> tuple[bytes, bool]:
        """The first response for this request id, and whether this call produced it
        (shared/idempotency.py); `customer_id` names the customer it is about, if any."""
        return await self.db.write(
            lambda connection: self.idempotency.run(
                connection, principal, rpc, request, carry_out, customer_id
            )
        )

    def insert_device(
        self, connection: Connection, device_id: str, registration: Registration, token_hash: str
    ) -> Device:
        """Adds a device with its slots in the caller's transaction."""
        taken = connection.execute(
            sa.select(devices.c.device_id).where(
                devices.c.manufacturer == registration.manufacturer,
                devices.c.model == registration.model,
                devices.c.serial_number == registration.serial_number,
                devices.c.state == ACTIVE,
            )
        ).first()
        if taken is not None:
            raise AlreadyExists(
                "an active device with this manufacturer, model and serial number is registered",
                reason="DEVICE_ALREADY_REGISTERED",
                metadata={"device_id": taken.device_id},
            )
        now = now_micros()
        connection.execute(
            devices.insert().values(
                device_id=device_id,
                customer_id=registration.customer_id,
                manufacturer=registration.manufacturer,
                model=registration.model,
                kind=registration.kind,
                serial_number=registration.serial_number,
                display_name=registration.display_name,
                firmware_version=registration.firmware_version,
                attributes=json.dumps(registration.attributes, sort_keys=True),
                state=ACTIVE,
                token_hash=token_hash,
                token_create_time_us=now,
                last_seen_time_us=None,
                create_time_us=now,
                update_time_us=now,
                deregister_time_us=None,
                test=registration.test,
            )
        )
        if registration.slots:
            connection.execute(slots.insert(), [_slot_row(device_id, s, now) for s in registration.slots])
        return load_device(connection, device_id)

    async def get_device(self, device_id: str) -> Device:
        return await self.db.read(lambda connection: load_device(connection, device_id))

    async def device_token(self, digest: str) -> tuple[str, str] | None:
        """(device_id, token hash) of the active device whose current token, or previous one
        within its grace (RotateDeviceToken), hashes to `digest`. Read on every device call,
        never cached: a deregistration or rotation holds from the next call on."""

        def query(connection: Connection) -> tuple[str, str] | None:
            # Driver SQL: this runs before every device call, and SQLAlchemy's statement
            # building would cost more than the indexed look-up itself.
            row = driver_sql(connection, _BY_TOKEN_HASH, (digest,)).first()
            if row is None:
                row = driver_sql(connection, _BY_PREVIOUS_HASH, (digest, now_micros())).first()
            return (row[0], row[1]) if row else None

        try:
            return await self.db.lookup(query)
        except sa.exc.DBAPIError as error:
            raise Unavailable(
                "device tokens cannot be checked right now; retry", reason="TOKEN_STORE_UNAVAILABLE"
            ) from error

    # -- data-subject requests (services/replenishment/data_subject.py) ------------------

    def customer_devices(self, connection: Connection, customer_id: str) -> list[Device]:
        """The customer's devices (retired ones too) with their slots, oldest first."""
        device_ids = connection.execute(
            sa.select(devices.c.device_id)
            .where(devices.c.customer_id == customer_id)
            .order_by(devices.c.create_time_us, devices.c.device_id)
        ).scalars()
        return [load_device(connection, device_id) for device_id in device_ids]

    def stored_responses(self, connection: Connection, customer_id: str) -> list[StoredReply]:
        return self.idempotency.replies_about(connection, [customer_id])

    def erase_customer(self, connection: Connection, customer_id: str) -> dict[str, int]:
        """Deletes the customer's devices, their slots and the stored responses about the
        customer in the caller's transaction; returns how many rows of each kind went."""
        # Orders are kept for accounting, pseudonymised (orders.py); first, since cancelling the
        # pending ones writes slot events that the slot feed's erasure below removes.
        from services.replenishment.orders import pseudonymise_customer  # orders.py imports this module

        kept = pseudonymise_customer(
            connection, customer_id, self.idempotency.pseudonym(customer_id), now_micros()
        )
        # Locked, then deleted by id: a device registered meanwhile (PostgreSQL runs writers
        # in parallel) is neither half-deleted nor in the way; it is newer than the erasure.
        device_ids = list(
            connection.execute(
                sa.select(devices.c.device_id)
                .where(devices.c.customer_id == customer_id)
                .order_by(devices.c.device_id)
                .with_for_update()
            ).scalars()
        )
        erased_slots = erased_devices = erased_readings = 0
        if device_ids:
            erased_readings = connection.execute(
                readings.delete().where(readings.c.device_id.in_(device_ids))
            ).rowcount
            erased_slots = connection.execute(
                slots.delete().where(slots.c.device_id.in_(device_ids))
            ).rowcount
            erased_devices = connection.execute(
                devices.delete().where(devices.c.device_id.in_(device_ids))
            ).rowcount
        erased_events = connection.execute(
            slot_events.delete().where(slot_events.c.customer_id == customer_id)
        ).rowcount
        stored = self.idempotency.forget_customers(connection, [customer_id])
        return {
            "devices": erased_devices,
            "slots": erased_slots,
            "readings": erased_readings,
            "slot_events": erased_events,
            "stored_responses": stored,
            **kept,
        }
