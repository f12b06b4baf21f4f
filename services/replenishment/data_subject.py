"""najimi.privacy.v1.DataSubjectService of the replenishment service: a customer's export and erasure.

What this service holds about a customer: their devices (retired ones too) with their
slots, the slots' readings, the slot events of their devices, and the stored responses of
RegisterDevice and Replenish calls for them (kept for retries).
Device tokens are never exported: only their hashes are stored, and those are secrets
of the device, not data about the customer. The document has one shape whether or not
the customer is known:

    {"customer_id": ..., "held": {"devices": [...], "stored_responses": [...]},
     "not_held_yet": {...}}

An export is a read: a retry with the same request_id reads the data again rather than
keeping a second copy of it (the document is the same while the data is unchanged).

Erasure deletes the devices, their slots, readings and slot events (the devices' tokens
with them: the next call of an erased device is UNAUTHENTICATED) and those stored
responses in one transaction; it is idempotent by request_id (a retry returns the first
result). The service keeps no tombstone: the customer may register devices again later.
"""

from __future__ import annotations

from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf import json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment.devices import Device
from services.replenishment.orders import customer_orders
from services.replenishment.servicer import DEVICE_STATES, POLICY_VALUES
from services.replenishment.slots import Slot
from services.replenishment.store import ReplenishmentStore, readings, slot_events
from shared.data_subject import (
    check_request,
    erase_once,
    rfc3339,
    stored_response_document,
    struct_of,
)
from shared.db import now_micros
from shared.idempotency import StoredReply
from shared.proto_time import duration_of_micros, timestamp_of

SERVICE = "replenishment"
# Stored responses by RPC, for the export to show them as JSON.
STORED_RESPONSE_TYPES: dict[str, Any] = {
    "RegisterDevice": pb.RegisterDeviceResponse,
    "CreateSlot": pb.CreateSlotResponse,
    "RotateDeviceToken": pb.RotateDeviceTokenResponse,
    "Replenish": device_pb.ReplenishResponse,
}
NOT_HELD_YET = {
    "forecasts": "depletion forecasts are computed when asked for, never stored",
}


def duration_text(micros: int | None) -> str | None:
    """A duration as in protobuf's JSON mapping, e.g. "172800s"."""
    duration = duration_of_micros(micros)
    return None if duration is None else duration.ToJsonString()


def slot_document(slot: Slot) -> dict[str, Any]:
    settings = slot.settings
    assert settings.policy is not None
    limits = settings.limits
    return {
        "slot_id": settings.slot_id,
        "display_name": settings.display_name,
        "item_id": settings.item_id,
        "capacity": settings.capacity,
        "unit": settings.unit,
        "reorder_quantity": settings.reorder_quantity,
        "unit_price_micros": settings.unit_price_micros,
        "currency_code": settings.currency_code,
        "policy": pb.SlotPolicy.Name(POLICY_VALUES[settings.policy]),
        "lead_time": duration_text(settings.lead_time_us),
        "service_level": settings.service_level,
        "fallback_reorder_level": settings.fallback_reorder_level,
        "limits": {
            "max_orders_per_period": limits.max_orders_per_period,
            "period": duration_text(limits.period_us),
            "max_spend_micros": limits.max_spend_micros,
            "currency_code": limits.currency_code,
        },
        "expected_stock_after_delivery": settings.expected_stock_after_delivery,
        "paused": slot.paused,
        "level": slot.state.level,
        "level_time": rfc3339(slot.state.level_time_us),
        "last_refill_time": rfc3339(slot.state.last_refill_time_us),
        "create_time": rfc3339(slot.create_time_us),
        "update_time": rfc3339(slot.update_time_us),
    }


def device_document(device: Device) -> dict[str, Any]:
    return {
        "device_id": device.device_id,
        "manufacturer": device.manufacturer,
        "model": device.model,
        "kind": device.kind,
        "serial_number": device.serial_number,
        "display_name": device.display_name,
        "firmware_version": device.firmware_version,
        "attributes": dict(sorted(device.attributes.items())),
        "state": pb.DeviceState.Name(DEVICE_STATES[device.state]),
        "slots": [slot_document(slot) for slot in device.slots],
        "create_time": rfc3339(device.create_time_us),
        "update_time": rfc3339(device.update_time_us),
        "deregister_time": rfc3339(device.deregister_time_us),
        "token_create_time": rfc3339(device.token_create_time_us),
        "last_seen_time": rfc3339(device.last_seen_time_us),
        "test": device.test,
        "paused": device.paused,
    }


def export_document(
    customer_id: str,
    devices: list[Device],
    stored: list[StoredReply],
    held_readings: list[dict[str, Any]],
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "held": {
            "devices": [device_document(device) for device in devices],
            "readings": held_readings,
            "slot_events": events,
            "stored_responses": [stored_response_document(s, STORED_RESPONSE_TYPES) for s in stored],
        },
        "not_held_yet": NOT_HELD_YET,
    }


def readings_of(connection: Connection, device_ids: list[str]) -> list[dict[str, Any]]:
    """Every stored reading of these devices, by device, slot and measure time."""
    if not device_ids:
        return []
    rows = connection.execute(
        sa.select(readings)
        .where(readings.c.device_id.in_(device_ids))
        .order_by(readings.c.device_id, readings.c.slot_id, readings.c.measure_time_us, readings.c.reading_id)
    )
    return [
        {
            "device_id": row.device_id,
            "slot_id": row.slot_id,
            "reading_id": row.reading_id,
            "level": row.level,
            "measure_time": rfc3339(row.measure_time_us),
            "receive_time": rfc3339(row.receive_time_us),
            "refill": row.refill,
        }
        for row in rows
    ]


def slot_events_of(connection: Connection, customer_id: str) -> list[dict[str, Any]]:
    rows = connection.execute(
        sa.select(slot_events)
        .where(slot_events.c.customer_id == customer_id)
        .order_by(slot_events.c.revision)
    )
    return [
        {
            "revision": row.revision,
            "type": row.type,
            "device_id": row.device_id,
            "slot_id": row.slot_id,
            "outcome": row.outcome,
            "order_id": row.order_id,
            "level": row.level,
            "message": row.message,
            "event_time": rfc3339(row.event_time_us),
        }
        for row in rows
    ]


class ReplenishmentDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, store: ReplenishmentStore):
        self.store = store

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        customer_id = request.customer_id
        exported_at = now_micros()

        def read(connection: Connection) -> dict[str, Any]:
            devices = self.store.customer_devices(connection, customer_id)
            document = export_document(
                customer_id,
                devices,
                self.store.stored_responses(connection, customer_id),
                readings_of(connection, [device.device_id for device in devices]),
                slot_events_of(connection, customer_id),
            )
            # The customer's orders (orders.py), as the order messages of the API.
            document["held"]["orders"] = [
                json_format.MessageToDict(order, preserving_proto_field_name=True)
                for order in customer_orders(connection, customer_id)
            ]
            return document

        document = await self.store.db.read(read)
        return privacy_pb.ExportCustomerDataResponse(
            service=SERVICE, export_time=timestamp_of(exported_at), document=struct_of(document)
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await erase_once(
            self.store.db,
            self.store.idempotency,
            SERVICE,
            request,
            lambda connection, customer_id, *_: self.store.erase_customer(connection, customer_id),
        )
