"""ReplenishmentService (back ends) over gRPC: protobuf in, domain calls, protobuf out.

The device API (najimi.replenishment.device.v1.DeviceService) is in device_api.py.

RPCs not written here yet are answered UNIMPLEMENTED by the generated base classes, after
the access check (shared/interceptors.py); the module map is in services/replenishment/__init__.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import Connection

from services.replenishment import lifecycle, orders, slot_events
from services.replenishment.devices import (
    Device,
    DeviceState,
    Registration,
    check_attributes,
    new_device_id,
    settled_registration,
)
from services.replenishment.order_rpcs import OrderDesk, OrderRpcs
from services.replenishment.slot_events import SlotFeed, SlotFilter
from services.replenishment.slots import (
    SLOT_ID,
    Slot,
    SlotLimits,
    SlotPolicy,
    SlotSettings,
    SlotStatus,
    masked_slot,
    settled_slot,
)
from services.replenishment.store import ReplenishmentStore
from services.replenishment.text import check_opaque_id, check_text
from shared.auth import current_principal, hash_token, new_token
from shared.db import now_micros
from shared.errors import InvalidArgument, NotFound, OutOfRange
from shared.page_tokens import ServiceTokens
from shared.proto_time import duration_micros_from, duration_of_micros, seconds_from, timestamp_of
from shared.validation import Violations, page_size_of

MAX_TOKEN_GRACE_US = 24 * 3_600 * 1_000_000
DEFAULT_HEARTBEAT_SECONDS = 15.0

POLICIES = {
    pb.SLOT_POLICY_AUTO: SlotPolicy.AUTO,
    pb.SLOT_POLICY_NOTIFY_ONLY: SlotPolicy.NOTIFY_ONLY,
    pb.SLOT_POLICY_OFF: SlotPolicy.OFF,
}
POLICY_VALUES = {policy: value for value, policy in POLICIES.items()}
DEVICE_STATES = {
    DeviceState.ACTIVE: pb.DEVICE_STATE_ACTIVE,
    DeviceState.DEREGISTERED: pb.DEVICE_STATE_DEREGISTERED,
}


def _micros_of(violations: Violations, path: str, message: Any, name: str) -> int | None:
    """The duration field `name` of `message` in microseconds; None when unset."""
    if not message.HasField(name):
        return None
    # An invalid one is a violation (None then, as if unset); the range is slots.py's check.
    return duration_micros_from(getattr(message, name), path, violations=violations)


def slot_settings_of(violations: Violations, prefix: str, slot: pb.Slot) -> SlotSettings:
    """A slot message's settings (output-only fields ignored); unknown enum values are violations."""
    policy = None
    if slot.policy != pb.SLOT_POLICY_UNSPECIFIED:
        policy = POLICIES.get(slot.policy)
        if policy is None:
            violations.add(f"{prefix}.policy", f"{slot.policy} is not a SlotPolicy")
    limits = slot.limits
    return SlotSettings(
        slot_id=slot.slot_id,
        display_name=slot.display_name,
        item_id=slot.item_id,
        capacity=slot.capacity,
        unit=slot.unit,
        reorder_quantity=slot.reorder_quantity,
        unit_price_micros=slot.unit_price_micros,
        currency_code=slot.currency_code,
        policy=policy,
        lead_time_us=_micros_of(violations, f"{prefix}.lead_time", slot, "lead_time"),
        service_level=slot.service_level,
        fallback_reorder_level=slot.fallback_reorder_level,
        limits=SlotLimits(
            max_orders_per_period=limits.max_orders_per_period,
            period_us=_micros_of(violations, f"{prefix}.limits.period", limits, "period"),
            max_spend_micros=limits.max_spend_micros,
            currency_code=limits.currency_code,
        ),
        expected_stock_after_delivery=slot.expected_stock_after_delivery,
    )


STATUSES = {
    SlotStatus.NO_DATA: pb.SLOT_STATUS_NO_DATA,
    SlotStatus.OK: pb.SLOT_STATUS_OK,
    SlotStatus.LOW: pb.SLOT_STATUS_LOW,
    SlotStatus.EMPTY: pb.SLOT_STATUS_EMPTY,
}


def slot_state_message(slot: Slot) -> pb.SlotState:
    """What telemetry and the orders say of the slot."""
    state = slot.state
    return pb.SlotState(
        open_order_id=slot.orders.open_order_id,
        orders_in_period=slot.orders.orders_in_period,
        spend_in_period_micros=slot.orders.spend_in_period_micros,
        level=state.level or 0.0,
        level_time=timestamp_of(state.level_time_us),
        status=STATUSES[slot.status],
        last_refill_time=timestamp_of(state.last_refill_time_us),
        last_outcome=pb.ReplenishOutcome.Value(f"REPLENISH_OUTCOME_{state.last_outcome or 'UNSPECIFIED'}"),
        epoch_start_time=timestamp_of(state.epoch_start_time_us),
    )


def slot_message(slot: Slot) -> pb.Slot:
    settings = slot.settings
    assert settings.policy is not None and settings.lead_time_us is not None
    assert settings.limits.period_us is not None
    return pb.Slot(
        device_id=slot.device_id,
        slot_id=settings.slot_id,
        display_name=settings.display_name,
        item_id=settings.item_id,
        capacity=settings.capacity,
        unit=settings.unit,
        reorder_quantity=settings.reorder_quantity,
        unit_price_micros=settings.unit_price_micros,
        currency_code=settings.currency_code,
        policy=POLICY_VALUES[settings.policy],
        lead_time=duration_of_micros(settings.lead_time_us),
        service_level=settings.service_level,
        safety_z=slot.safety_z,
        fallback_reorder_level=settings.fallback_reorder_level,
        limits=pb.SlotLimits(
            max_orders_per_period=settings.limits.max_orders_per_period,
            period=duration_of_micros(settings.limits.period_us),
            max_spend_micros=settings.limits.max_spend_micros,
            currency_code=settings.limits.currency_code,
        ),
        state=slot_state_message(slot),
        paused=slot.paused,
        expected_stock_after_delivery=settings.expected_stock_after_delivery,
        create_time=timestamp_of(slot.create_time_us),
        update_time=timestamp_of(slot.update_time_us),
    )


def device_message(device: Device) -> pb.Device:
    return pb.Device(
        device_id=device.device_id,
        customer_id=device.customer_id,
        manufacturer=device.manufacturer,
        model=device.model,
        kind=device.kind,
        serial_number=device.serial_number,
        display_name=device.display_name,
        firmware_version=device.firmware_version,
        attributes=device.attributes,
        state=DEVICE_STATES[device.state],
        slots=[slot_message(slot) for slot in device.slots],
        create_time=timestamp_of(device.create_time_us),
        update_time=timestamp_of(device.update_time_us),
        deregister_time=timestamp_of(device.deregister_time_us),
        token_create_time=timestamp_of(device.token_create_time_us),
        last_seen_time=timestamp_of(device.last_seen_time_us),
        test=device.test,
        paused=device.paused,
    )


def _checked_device_id(device_id: str) -> str:
    violations = Violations()
    violations.require_id("device_id", device_id)
    violations.raise_if_any()
    return device_id


class ReplenishmentServicer(OrderRpcs, pb_grpc.ReplenishmentServiceServicer):
    """The back-end API; the order RPCs are order_rpcs.py's (OrderRpcs)."""

    def __init__(
        self, store: ReplenishmentStore, pages: ServiceTokens, slot_feed: SlotFeed, orders: OrderDesk
    ):
        self.store = store
        self.db = store.db
        self.pages = pages
        self.slot_feed = slot_feed
        self.orders = orders

    async def RegisterDevice(
        self, request: pb.RegisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        registration = settled_registration(
            violations,
            Registration(
                customer_id=request.customer_id,
                manufacturer=request.manufacturer,
                model=request.model,
                kind=request.kind,
                serial_number=request.serial_number,
                display_name=request.display_name,
                firmware_version=request.firmware_version,
                attributes=dict(request.attributes),
                slots=tuple(
                    slot_settings_of(violations, f"slots[{index}]", slot)
                    for index, slot in enumerate(request.slots)
                ),
                test=request.test,
            ),
        )
        violations.raise_if_any()
        token = new_token()

        def register(connection: Connection) -> bytes:
            device = self.store.insert_device(connection, new_device_id(), registration, hash_token(token))
            lifecycle.registered(connection, device, device.create_time_us)
            # Remembered without the token: a retry gets the device, never the token again.
            return pb.RegisterDeviceResponse(device=device_message(device)).SerializeToString()

        stored, created = await self.store.once(
            str(current_principal()),
            "RegisterDevice",
            request,
            register,
            customer_id=registration.customer_id,
        )
        self.slot_feed.poke()  # DEVICE_REGISTERED
        response = pb.RegisterDeviceResponse.FromString(stored)
        if created:
            response.device_token = token
        return response

    # Devices --------------------------------------------------------------------------------

    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext) -> Any:
        device = await self.store.get_device(_checked_device_id(request.device_id))
        return pb.GetDeviceResponse(device=device_message(device))

    async def ListDevices(self, request: pb.ListDevicesRequest, context: grpc.aio.ServicerContext) -> Any:
        if request.customer_id:
            violations = Violations()
            check_opaque_id(violations, "customer_id", request.customer_id)
            violations.raise_if_any()
        elif not current_principal().is_admin:
            raise InvalidArgument("customer_id", "is required", reason="CUSTOMER_ID_REQUIRED")
        size = page_size_of(request.page_size)
        filters = {"customer_id": request.customer_id, "show_deregistered": request.show_deregistered}
        position = self.pages.read("ListDevices", request.page_token, filters, (int, str))
        after = (int(position[0]), str(position[1])) if position else None
        found = await self.db.read(
            lambda c: lifecycle.list_devices(c, request.customer_id, request.show_deregistered, after, size)
        )
        last = found[-1] if len(found) == size else None
        return pb.ListDevicesResponse(
            devices=[device_message(device) for device in found],
            next_page_token=(
                self.pages.issue("ListDevices", filters, (last.create_time_us, last.device_id))
                if last
                else ""
            ),
        )

    async def UpdateDevice(self, request: pb.UpdateDeviceRequest, context: grpc.aio.ServicerContext) -> Any:
        given = request.device
        violations = Violations()
        violations.require_id("device.device_id", given.device_id)
        paths = list(request.update_mask.paths)
        if not paths:
            violations.add("update_mask", "is required: name the fields to change")
        values: dict[str, object] = {}
        for path in paths:
            if path == "display_name":
                check_text(violations, "device.display_name", given.display_name, 0, 200)
                values[path] = given.display_name
            elif path == "firmware_version":
                check_text(violations, "device.firmware_version", given.firmware_version, 0, 64)
                values[path] = given.firmware_version
            elif path == "attributes":
                check_attributes(violations, "device.attributes", dict(given.attributes))
                values[path] = dict(given.attributes)
            else:
                violations.add("update_mask", f"{path!r} is not an updatable path of Device")
        violations.raise_if_any()
        device = await self.db.write(
            lambda c: lifecycle.update_device(c, given.device_id, values, now_micros())
        )
        return pb.UpdateDeviceResponse(device=device_message(device))

    async def DeregisterDevice(
        self, request: pb.DeregisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        device_id = _checked_device_id(request.device_id)

        def deregister(c: Connection) -> tuple[Device, list[str]]:
            now = now_micros()
            device, retired = lifecycle.deregister(c, device_id, now)
            # Its PENDING orders are cancelled with it (orders.py); PLACED and SHIPPED ones go on.
            cancelled = (
                orders.cancel_pending_of_slot(c, device_id, None, "DEVICE_DEREGISTERED", now)
                if retired
                else []
            )
            return device, cancelled

        device, cancelled = await self.db.write(deregister)
        await self.orders.feed.notify()
        return pb.DeregisterDeviceResponse(device=device_message(device), cancelled_order_ids=cancelled)

    async def RotateDeviceToken(
        self, request: pb.RotateDeviceTokenRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        violations.require_id("device_id", request.device_id)
        grace = 0
        if request.HasField("previous_token_grace"):
            grace = (
                duration_micros_from(
                    request.previous_token_grace,
                    "previous_token_grace",
                    at_least=0,
                    at_most=MAX_TOKEN_GRACE_US,
                    bounds="must be 0 to 24 hours",
                    violations=violations,
                )
                or 0
            )
        violations.raise_if_any()
        token = new_token()

        def rotate(connection: Connection) -> bytes:
            now = now_micros()
            _, expire_us = lifecycle.rotate_token(
                connection, request.device_id, hash_token(token), grace, now
            )
            return pb.RotateDeviceTokenResponse(
                token_create_time=timestamp_of(now), previous_token_expire_time=timestamp_of(expire_us)
            ).SerializeToString()

        stored, created = await self.store.once(
            str(current_principal()),
            "RotateDeviceToken",
            request,
            rotate,
            customer_id=await self._customer_of(request.device_id),
        )
        response = pb.RotateDeviceTokenResponse.FromString(stored)
        if created:
            response.device_token = token  # shown once: never stored, never in a retry's answer
        return response

    async def _customer_of(self, device_id: str) -> str | None:
        """The device's customer (None for an unknown device: the call then fails NOT_FOUND)."""
        try:
            return (await self.store.get_device(device_id)).customer_id
        except NotFound:
            return None

    async def PauseDevice(self, request: pb.PauseDeviceRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.PauseDeviceResponse(device=await self._pause_device(request.device_id, True))

    async def ResumeDevice(self, request: pb.ResumeDeviceRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ResumeDeviceResponse(device=await self._pause_device(request.device_id, False))

    async def _pause_device(self, device_id: str, paused: bool) -> pb.Device:
        _checked_device_id(device_id)
        device = await self.db.write(
            lambda c: lifecycle.set_device_paused(c, device_id, paused, now_micros())
        )
        self.slot_feed.poke()  # PAUSED or RESUMED
        return device_message(device)

    # Slots ----------------------------------------------------------------------------------

    async def CreateSlot(self, request: pb.CreateSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        violations.require_id("device_id", request.device_id)
        settings = settled_slot(violations, "slot", slot_settings_of(violations, "slot", request.slot))
        violations.raise_if_any()

        def create(connection: Connection) -> bytes:
            slot = lifecycle.create_slot(connection, request.device_id, settings, now_micros())
            return pb.CreateSlotResponse(slot=slot_message(slot)).SerializeToString()

        # Kept for retries about the device's customer: an erasure of the customer removes it.
        stored, _ = await self.store.once(
            str(current_principal()),
            "CreateSlot",
            request,
            create,
            customer_id=await self._customer_of(request.device_id),
        )
        return pb.CreateSlotResponse.FromString(stored)

    async def GetSlot(self, request: pb.GetSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        device_id, slot_id = _checked_slot_key(request.device_id, request.slot_id)
        slot = await self.db.read(lambda c: lifecycle.load_slot(c, device_id, slot_id))
        return pb.GetSlotResponse(slot=slot_message(slot))

    async def ListSlots(self, request: pb.ListSlotsRequest, context: grpc.aio.ServicerContext) -> Any:
        device_id = _checked_device_id(request.device_id)
        size = page_size_of(request.page_size)
        filters = {"device_id": device_id}
        position = self.pages.read("ListSlots", request.page_token, filters, (str,))
        device = await self.store.get_device(device_id)
        after = str(position[0]) if position else ""
        found = [slot for slot in device.slots if slot.settings.slot_id > after][:size]
        return pb.ListSlotsResponse(
            slots=[slot_message(slot) for slot in found],
            next_page_token=(
                self.pages.issue("ListSlots", filters, (found[-1].settings.slot_id,))
                if len(found) == size
                else ""
            ),
        )

    async def UpdateSlot(self, request: pb.UpdateSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        device_id, slot_id = _checked_slot_key(request.slot.device_id, request.slot.slot_id, "slot.")
        violations = Violations()
        given = slot_settings_of(violations, "slot", request.slot)
        paths = list(request.update_mask.paths)
        violations.raise_if_any()  # the mask and the resulting slot are checked against the stored one

        def change(current: SlotSettings) -> SlotSettings:
            checked = Violations()
            settings = masked_slot(checked, current, given, paths)
            checked.raise_if_any()
            return settings

        def update(c: Connection) -> tuple[Slot, list[str]]:
            now = now_micros()
            slot = lifecycle.update_slot(c, device_id, slot_id, change, now)
            cancelled: list[str] = []
            if slot.settings.policy is not SlotPolicy.AUTO:  # the service's and the device's orders
                cancelled = orders.cancel_pending_of_slot(
                    c, device_id, slot_id, "POLICY_CHANGED", now, orders.CONSENTED_TRIGGERS
                )
            return slot, cancelled

        slot, cancelled = await self.db.write(update)
        await self.orders.feed.notify()
        return pb.UpdateSlotResponse(slot=slot_message(slot), cancelled_order_id=next(iter(cancelled), ""))

    async def DeleteSlot(self, request: pb.DeleteSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        device_id, slot_id = _checked_slot_key(request.device_id, request.slot_id)

        def delete(c: Connection) -> list[str]:
            # The slot's PENDING order goes with it (orders.py); PLACED and SHIPPED ones go on.
            cancelled = orders.cancel_pending_of_slot(c, device_id, slot_id, "SLOT_DELETED", now_micros())
            lifecycle.delete_slot(c, device_id, slot_id, request.allow_missing)
            return cancelled

        cancelled = await self.db.write(delete)
        await self.orders.feed.notify()
        return pb.DeleteSlotResponse(cancelled_order_id=next(iter(cancelled), ""))

    async def PauseSlot(self, request: pb.PauseSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.PauseSlotResponse(slot=await self._pause_slot(request.device_id, request.slot_id, True))

    async def ResumeSlot(self, request: pb.ResumeSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        return pb.ResumeSlotResponse(slot=await self._pause_slot(request.device_id, request.slot_id, False))

    async def _pause_slot(self, device_id: str, slot_id: str, paused: bool) -> pb.Slot:
        _checked_slot_key(device_id, slot_id)
        slot = await self.db.write(
            lambda c: lifecycle.set_slot_paused(c, device_id, slot_id, paused, now_micros())
        )
        self.slot_feed.poke()  # PAUSED or RESUMED
        return slot_message(slot)

    # The slot feed ----------------------------------------------------------------------------

    async def _slot_filter(self, request: Any) -> tuple[SlotFilter, int]:
        violations = Violations()
        if request.customer_id:
            check_opaque_id(violations, "customer_id", request.customer_id)
        if request.device_id:
            violations.require_id("device_id", request.device_id)
        violations.require_count("since_revision", request.since_revision)
        types = set()
        for index, value in enumerate(request.types):
            name = pb.SlotEventType.Name(value) if value in pb.SlotEventType.values() else ""
            if not name or value == pb.SLOT_EVENT_TYPE_UNSPECIFIED:
                violations.add(f"types[{index}]", f"{value} is not a SlotEventType")
            else:
                types.add(name.removeprefix("SLOT_EVENT_TYPE_"))
        violations.raise_if_any()
        if not (request.customer_id or request.device_id or current_principal().is_admin):
            raise InvalidArgument("customer_id", "set customer_id or device_id", reason="FILTER_REQUIRED")
        head, purged = await self.db.read(lambda c: (slot_events.head(c), slot_events.purged_through(c)))
        if request.since_revision > head:
            raise OutOfRange(
                f"since_revision {request.since_revision} is ahead of the current revision {head}",
                reason="REVISION_AHEAD",
            )
        # 0 means "from the oldest retained event"; a later position must not lie before it.
        if request.since_revision and request.since_revision < purged:
            raise OutOfRange(
                f"events up to {purged} are no longer kept: list again from 0 and continue from there",
                reason="REVISION_COMPACTED",
            )
        return SlotFilter(request.customer_id, request.device_id, frozenset(types)), head

    async def ListSlotEvents(
        self, request: pb.ListSlotEventsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        wanted, _ = await self._slot_filter(request)
        size = page_size_of(request.page_size)
        filters = {**wanted.as_filters(), "since_revision": request.since_revision}
        position = self.pages.read("ListSlotEvents", request.page_token, filters, (int,))
        since = int(position[0]) if position else request.since_revision

        def page(connection: Connection) -> tuple[list[pb.SlotEvent], int]:
            return slot_events.events_after(connection, since, wanted, size), slot_events.head(connection)

        found, head = await self.db.read(page)
        return pb.ListSlotEventsResponse(
            events=found,
            next_page_token=(
                self.pages.issue("ListSlotEvents", filters, (found[-1].revision,))
                if len(found) == size
                else ""
            ),
            current_revision=head,
        )

    async def WatchSlotEvents(
        self, request: pb.WatchSlotEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSlotEventsResponse]:
        interval = (
            seconds_from(request.heartbeat_interval, "heartbeat_interval", at_least=1, at_most=60)
            if request.HasField("heartbeat_interval")
            else DEFAULT_HEARTBEAT_SECONDS
        )
        wanted, _ = await self._slot_filter(request)
        async for response in self.slot_feed.watch(request.since_revision, wanted, interval):
            yield response


def _checked_slot_key(device_id: str, slot_id: str, prefix: str = "") -> tuple[str, str]:
    violations = Violations()
    violations.require_id(f"{prefix}device_id", device_id)
    violations.require_id(f"{prefix}slot_id", slot_id, SLOT_ID)
    violations.raise_if_any()
    return device_id, slot_id
