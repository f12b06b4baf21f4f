"""Writes of the device and slot life cycle, each in the caller's transaction with its slot event.

Registration (DEVICE_REGISTERED), deregistration (DEVICE_DEREGISTERED: the token and any
previous token in its grace stop authenticating with the commit), token rotation, device
updates, pause and resume of a device or a slot (PAUSED / RESUMED, only on a change), and
slot creation, update and deletion (its readings go with it). Orders a change affects
(PENDING orders of a deregistered device, a deleted slot or a slot leaving AUTO) are
orders.py's; these functions leave them alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.replenishment import slot_events
from services.replenishment.devices import MAX_SLOTS, Device, DeviceState
from services.replenishment.slots import Slot, SlotSettings
from services.replenishment.store import (
    _device,
    _slot,
    _slot_row,
    active_device,
    devices,
    load_device,
    readings,
    slot_of,
    slots,
    with_orders,
)
from shared.errors import AlreadyExists, FailedPrecondition, NotFound


def _device_event(connection: Connection, device: Device, event_type: str, now_us: int, message: str) -> None:
    slot_events.append(
        connection,
        customer_id=device.customer_id,
        device_id=device.device_id,
        slot_id="",
        event_type=event_type,
        now_us=now_us,
        message=message,
        test=device.test,
    )


def registered(connection: Connection, device: Device, now_us: int) -> None:
    """The DEVICE_REGISTERED event of a device just inserted."""
    _device_event(connection, device, "DEVICE_REGISTERED", now_us, f"{device.kind} registered")


def deregister(connection: Connection, device_id: str, now_us: int) -> tuple[Device, bool]:
    """Retires an active device and revokes its tokens; (device, whether this call retired it)."""
    device = load_device(connection, device_id)
    if device.state is not DeviceState.ACTIVE:
        return device, False
    connection.execute(
        devices.update()
        .where(devices.c.device_id == device_id)
        .values(
            state=DeviceState.DEREGISTERED.value,
            token_hash=None,
            previous_token_hash=None,
            previous_token_expire_time_us=None,
            deregister_time_us=now_us,
            update_time_us=now_us,
        )
    )
    _device_event(connection, device, "DEVICE_DEREGISTERED", now_us, f"{device.kind} deregistered")
    return load_device(connection, device_id), True


def rotate_token(
    connection: Connection, device_id: str, token_hash: str, grace_us: int, now_us: int
) -> tuple[Device, int]:
    """Gives an active device a new token; the current one keeps working for `grace_us`
    (0: not at all). Returns the device and when the previous token stops authenticating."""
    active_device(connection, device_id)
    expire_us = now_us + grace_us
    connection.execute(
        devices.update()
        .where(devices.c.device_id == device_id)
        .values(
            previous_token_hash=devices.c.token_hash if grace_us > 0 else None,
            previous_token_expire_time_us=expire_us if grace_us > 0 else None,
            token_hash=token_hash,
            token_create_time_us=now_us,
        )
    )
    return load_device(connection, device_id), expire_us


def update_device(connection: Connection, device_id: str, values: dict[str, object], now_us: int) -> Device:
    """Sets the device fields in `values` (display_name, firmware_version, attributes);
    the same values again leave the device as it was (update_time included)."""
    device = active_device(connection, device_id)
    changed = {name: value for name, value in values.items() if getattr(device, name) != value}
    if changed:
        if "attributes" in changed:
            changed["attributes"] = json.dumps(changed["attributes"], sort_keys=True)
        connection.execute(
            devices.update().where(devices.c.device_id == device_id).values(**changed, update_time_us=now_us)
        )
    return load_device(connection, device_id)


def set_device_paused(connection: Connection, device_id: str, paused: bool, now_us: int) -> Device:
    """Pauses or resumes a device; an event only when that changes something."""
    device = active_device(connection, device_id)
    if device.paused == paused:
        return device
    connection.execute(devices.update().where(devices.c.device_id == device_id).values(paused=paused))
    event = "PAUSED" if paused else "RESUMED"
    _device_event(connection, device, event, now_us, f"ordering {event.lower()} for the device")
    return load_device(connection, device_id)


def list_devices(
    connection: Connection,
    customer_id: str,
    show_deregistered: bool,
    after: tuple[int, str] | None,
    limit: int,
) -> list[Device]:
    """Devices newest registration first (create time, then device_id, descending), after
    the position `after` of the previous page; slots loaded in one query."""
    query = sa.select(devices)
    if customer_id:
        query = query.where(devices.c.customer_id == customer_id)
    if not show_deregistered:
        query = query.where(devices.c.state == DeviceState.ACTIVE.value)
    if after is not None:
        query = query.where(sa.tuple_(devices.c.create_time_us, devices.c.device_id) < sa.tuple_(*after))
    rows = connection.execute(
        query.order_by(devices.c.create_time_us.desc(), devices.c.device_id.desc()).limit(limit)
    ).all()
    by_device: dict[str, list[Slot]] = {row.device_id: [] for row in rows}
    if by_device:
        found = connection.execute(
            sa.select(slots).where(slots.c.device_id.in_(list(by_device))).order_by(slots.c.slot_id)
        )
        for slot in with_orders(connection, [_slot(row) for row in found]):
            by_device[slot.device_id].append(slot)
    return [_device(row, tuple(by_device[row.device_id])) for row in rows]


# -- slots ------------------------------------------------------------------------------


def load_slot(connection: Connection, device_id: str, slot_id: str) -> Slot:
    return slot_of(load_device(connection, device_id), slot_id)


def create_slot(connection: Connection, device_id: str, settings: SlotSettings, now_us: int) -> Slot:
    device = active_device(connection, device_id)
    if any(slot.settings.slot_id == settings.slot_id for slot in device.slots):
        raise AlreadyExists(
            f"device {device_id} already has a slot {settings.slot_id}", reason="SLOT_ALREADY_EXISTS"
        )
    if len(device.slots) >= MAX_SLOTS:
        raise FailedPrecondition(
            f"device {device_id} already has {MAX_SLOTS} slots", reason="SLOT_LIMIT_REACHED"
        )
    connection.execute(slots.insert().values(**_slot_row(device_id, settings, now_us)))
    return load_slot(connection, device_id, settings.slot_id)


def update_slot(
    connection: Connection,
    device_id: str,
    slot_id: str,
    change: Callable[[SlotSettings], SlotSettings],
    now_us: int,
) -> Slot:
    """Replaces the slot's settings with `change(current settings)` (which checks them);
    the same settings again leave the slot as it was (update_time included)."""
    current = slot_of(active_device(connection, device_id), slot_id)
    settings = dataclasses.replace(change(current.settings), slot_id=slot_id)
    if settings != current.settings:
        row = _slot_row(device_id, settings, now_us)
        del row["create_time_us"], row["device_id"], row["slot_id"]
        connection.execute(
            slots.update().where(slots.c.device_id == device_id, slots.c.slot_id == slot_id).values(**row)
        )
    return load_slot(connection, device_id, slot_id)


def delete_slot(connection: Connection, device_id: str, slot_id: str, allow_missing: bool) -> bool:
    """Removes a slot and its readings; False when it was not there and `allow_missing`."""
    try:
        slot_of(active_device(connection, device_id), slot_id)
    except NotFound:
        if allow_missing:
            return False
        raise
    connection.execute(
        readings.delete().where(readings.c.device_id == device_id, readings.c.slot_id == slot_id)
    )
    connection.execute(slots.delete().where(slots.c.device_id == device_id, slots.c.slot_id == slot_id))
    return True


def set_slot_paused(connection: Connection, device_id: str, slot_id: str, paused: bool, now_us: int) -> Slot:
    device = active_device(connection, device_id)
    slot = slot_of(device, slot_id)
    if slot.paused == paused:
        return slot
    connection.execute(
        slots.update().where(slots.c.device_id == device_id, slots.c.slot_id == slot_id).values(paused=paused)
    )
    event = "PAUSED" if paused else "RESUMED"
    slot_events.append(
        connection,
        customer_id=device.customer_id,
        device_id=device_id,
        slot_id=slot_id,
        event_type=event,
        now_us=now_us,
        level=slot.state.level,
        message=f"ordering {event.lower()} for {slot.settings.display_name or slot_id}",
        test=device.test,
    )
    return load_slot(connection, device_id, slot_id)
