"""ReplenishmentService (back ends) over gRPC: protobuf in, domain calls, protobuf out.

The device API (najimi.replenishment.device.v1.DeviceService) is in device_api.py.

RPCs not written here yet are answered UNIMPLEMENTED by the generated base classes, after
the access check (shared/interceptors.py); the module map is in services/replenishment/__init__.py.
"""

from __future__ import annotations

from typing import Any

import grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import Connection

from services.replenishment.devices import (
    Device,
    DeviceState,
    Registration,
    new_device_id,
    settled_registration,
)
from services.replenishment.order_rpcs import OrderDesk, OrderRpcs
from services.replenishment.slots import Slot, SlotLimits, SlotPolicy, SlotSettings
from services.replenishment.store import ReplenishmentStore
from shared.auth import current_principal, hash_token, new_token
from shared.proto_time import duration_micros_from, duration_of_micros, timestamp_of
from shared.validation import Violations

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
        # Telemetry and orders come in later: until then every slot has no data.
        state=pb.SlotState(status=pb.SLOT_STATUS_NO_DATA),
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

    def __init__(self, store: ReplenishmentStore, orders: OrderDesk):
        self.store = store
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
            # Remembered without the token: a retry gets the device, never the token again.
            return pb.RegisterDeviceResponse(device=device_message(device)).SerializeToString()

        stored, created = await self.store.once(
            str(current_principal()),
            "RegisterDevice",
            request,
            register,
            customer_id=registration.customer_id,
        )
        response = pb.RegisterDeviceResponse.FromString(stored)
        if created:
            response.device_token = token
        return response

    async def GetDevice(self, request: pb.GetDeviceRequest, context: grpc.aio.ServicerContext) -> Any:
        device = await self.store.get_device(_checked_device_id(request.device_id))
        return pb.GetDeviceResponse(device=device_message(device))

    async def DeregisterDevice(
        self, request: pb.DeregisterDeviceRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        device = await self.store.deregister_device(_checked_device_id(request.device_id))
        # No orders exist yet; once they do, the PENDING ones this call cancels are listed here.
        return pb.DeregisterDeviceResponse(device=device_message(device))
