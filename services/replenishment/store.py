"""The replenishment service's tables and queries (SQLAlchemy Core)."""

from __future__ import annotations

import json
from collections.abc import Callable

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection

from services.replenishment.devices import Device, DeviceState, Registration
from services.replenishment.slots import Slot, SlotLimits, SlotPolicy, SlotSettings
from shared.db import Database, now_micros
from shared.errors import AlreadyExists, NotFound, Unavailable
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
    )
    return Slot(row.device_id, settings, row.create_time_us, row.update_time_us)


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
    )


def _load_device(connection: Connection, device_id: str) -> Device:
    row = connection.execute(sa.select(devices).where(devices.c.device_id == device_id)).first()
    if row is None:
        raise NotFound(f"device {device_id} does not exist", reason="DEVICE_NOT_FOUND")
    found = connection.execute(
        sa.select(slots).where(slots.c.device_id == device_id).order_by(slots.c.slot_id)
    )
    return _device(row, tuple(_slot(slot) for slot in found))


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
            )
        )
        if registration.slots:
            connection.execute(slots.insert(), [_slot_row(device_id, s, now) for s in registration.slots])
        return _load_device(connection, device_id)

    async def get_device(self, device_id: str) -> Device:
        return await self.db.read(lambda connection: _load_device(connection, device_id))

    async def deregister_device(self, device_id: str) -> Device:
        """Retires an active device and revokes its token; a retired device is returned unchanged."""

        def work(connection: Connection) -> Device:
            device = _load_device(connection, device_id)
            if device.state is not DeviceState.ACTIVE:
                return device
            now = now_micros()
            connection.execute(
                devices.update()
                .where(devices.c.device_id == device_id)
                .values(
                    state=DeviceState.DEREGISTERED.value,
                    token_hash=None,
                    deregister_time_us=now,
                    update_time_us=now,
                )
            )
            return _load_device(connection, device_id)

        return await self.db.write(work)

    async def device_token(self, digest: str) -> tuple[str, str] | None:
        """(device_id, token hash) of the active device whose token hashes to `digest`."""

        def query(connection: Connection) -> tuple[str, str] | None:
            row = connection.execute(
                sa.select(devices.c.device_id, devices.c.token_hash).where(
                    devices.c.token_hash == digest, devices.c.state == ACTIVE
                )
            ).first()
            return (row.device_id, row.token_hash) if row else None

        try:
            return await self.db.read(query)
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
        return [_load_device(connection, device_id) for device_id in device_ids]

    def stored_responses(self, connection: Connection, customer_id: str) -> list[StoredReply]:
        return self.idempotency.replies_about(connection, [customer_id])

    def erase_customer(self, connection: Connection, customer_id: str) -> dict[str, int]:
        """Deletes the customer's devices, their slots and the stored responses about the
        customer in the caller's transaction; returns how many rows of each kind went."""
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
        erased_slots = erased_devices = 0
        if device_ids:
            erased_slots = connection.execute(
                slots.delete().where(slots.c.device_id.in_(device_ids))
            ).rowcount
            erased_devices = connection.execute(
                devices.delete().where(devices.c.device_id.in_(device_ids))
            ).rowcount
        stored = self.idempotency.forget_customers(connection, [customer_id])
        return {"devices": erased_devices, "slots": erased_slots, "stored_responses": stored}
