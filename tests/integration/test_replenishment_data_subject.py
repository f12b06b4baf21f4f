"""The replenishment service's DataSubjectService over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from shared.auth import hash_token
from shared.db import Database
from shared.validation import MAX_MONEY_MICROS
from tests.conftest import error_reason, field_violations, rpc_error

CUSTOMER_ID = "cus_42"


def _registration(request_id: str, serial: str, customer_id: str = CUSTOMER_ID, **fields: object):
    values: dict[str, object] = dict(
        request_id=request_id,
        customer_id=customer_id,
        manufacturer="acme",
        model="inkjet-200",
        kind="printer",
        serial_number=serial,
        display_name="Office printer",
        attributes={"location": "office"},
    )
    values.update(fields)
    return pb.RegisterDeviceRequest(**values)  # type: ignore[arg-type]


def _slot(slot_id: str, **fields: object) -> pb.Slot:
    values: dict[str, object] = dict(slot_id=slot_id, item_id=f"ink-{slot_id}", capacity=250.0, unit="ml")
    values.update(fields)
    return pb.Slot(**values)  # type: ignore[arg-type]


async def _replenishment(start_service, database_url=None):
    service = await start_service("replenishment", database_url)
    return (
        service,
        pb_grpc.ReplenishmentServiceStub(service.channel),
        device_grpc.DeviceServiceStub(service.channel),
        privacy_grpc.DataSubjectServiceStub(service.channel),
    )


async def _register_devices(service, stub):
    """Two devices of the customer (one retired), three slots, and a device of someone else."""
    storefront = service.auth("service:storefront")
    printer = await stub.RegisterDevice(
        _registration(
            "reg-1",
            "SN-1",
            slots=[
                _slot("black", unit_price_micros=MAX_MONEY_MICROS, currency_code="EUR"),
                _slot("color", unit_price_micros=19_990_000, currency_code="EUR"),
            ],
        ),
        metadata=storefront,
    )
    filter_ = await stub.RegisterDevice(
        _registration("reg-2", "SN-2", kind="water_filter", slots=[_slot("cartridge")]), metadata=storefront
    )
    await stub.DeregisterDevice(
        pb.DeregisterDeviceRequest(device_id=filter_.device.device_id), metadata=storefront
    )
    other = await stub.RegisterDevice(
        _registration("reg-3", "SN-3", customer_id="cus_7"), metadata=storefront
    )
    return printer, filter_, other


def _export(
    customer_id: str = CUSTOMER_ID, request_id: str = "dsr-1"
) -> privacy_pb.ExportCustomerDataRequest:
    return privacy_pb.ExportCustomerDataRequest(customer_id=customer_id, request_id=request_id)


def _erase(customer_id: str = CUSTOMER_ID, request_id: str = "dsr-1") -> privacy_pb.EraseCustomerDataRequest:
    return privacy_pb.EraseCustomerDataRequest(customer_id=customer_id, request_id=request_id)


def _tables(database_url: str) -> dict[str, list[dict[str, object]]]:
    database = Database(database_url, "replenishment")

    def read(connection):
        names = [n for n in sa.inspect(connection).get_table_names() if n != "alembic_version"]
        return {
            name: [dict(row._mapping) for row in connection.execute(sa.text(f"SELECT * FROM {name}"))]  # noqa: S608
            for name in names
        }

    try:
        return database.transaction(read)
    finally:
        database.close()


async def test_export_lists_the_customers_devices_and_slots_without_tokens(start_service, database_url):
    service, stub, _, data_subject = await _replenishment(start_service, database_url)
    printer, filter_, _ = await _register_devices(service, stub)

    exported = await data_subject.ExportCustomerData(_export(), metadata=service.auth("service:consent"))
    assert exported.service == "replenishment" and exported.export_time.seconds > 1_700_000_000
    document = json_format.MessageToDict(exported.document)
    assert document["customer_id"] == CUSTOMER_ID
    devices = document["held"]["devices"]
    assert [d["device_id"] for d in devices] == [printer.device.device_id, filter_.device.device_id]
    first, second = devices
    assert (first["serial_number"], first["kind"], first["state"]) == (
        "SN-1",
        "printer",
        "DEVICE_STATE_ACTIVE",
    )
    assert first["attributes"] == {"location": "office"} and first["deregister_time"] is None
    assert second["state"] == "DEVICE_STATE_DEREGISTERED" and second["deregister_time"].endswith("Z")
    assert [s["slot_id"] for s in first["slots"]] == ["black", "color"]
    black, color = first["slots"]
    # Money is at most 10^15 micros, below 2^53: a double holds it exactly, so it travels as a number.
    assert black["unit_price_micros"] == MAX_MONEY_MICROS and color["unit_price_micros"] == 19_990_000
    assert color["policy"] == "SLOT_POLICY_NOTIFY_ONLY" and color["lead_time"] == "259200s"
    assert color["limits"]["period"] == "2592000s" and color["capacity"] == 250.0
    assert [s["slot_id"] for s in second["slots"]] == ["cartridge"]
    stored = document["held"]["stored_responses"]
    assert [(s["rpc"], s["request_id"], s["caller"]) for s in stored] == [
        ("RegisterDevice", "reg-1", "service:storefront"),
        ("RegisterDevice", "reg-2", "service:storefront"),
    ]
    assert stored[0]["response"]["device"]["deviceId"] == printer.device.device_id
    # Neither tokens nor their hashes are ever exported.
    text = str(document)
    assert "token_hash" not in text and "deviceToken" not in text
    assert printer.device_token not in text and hash_token(printer.device_token) not in text

    again = await data_subject.ExportCustomerData(_export(request_id="dsr-2"), metadata=service.auth("admin"))
    assert again.document == exported.document


async def test_an_unknown_customer_exports_an_empty_document(start_service, database_url):
    service, _, _, data_subject = await _replenishment(start_service, database_url)
    exported = await data_subject.ExportCustomerData(_export("nobody"), metadata=service.auth())
    assert json_format.MessageToDict(exported.document)["held"] == {
        "devices": [],
        "readings": [],
        "slot_events": [],
        "stored_responses": [],
        "orders": [],
    }


async def test_erasure_deletes_devices_slots_and_stored_responses(start_service, database_url):
    service, stub, devices, data_subject = await _replenishment(start_service, database_url)
    printer, filter_, other = await _register_devices(service, stub)
    consent = service.auth("service:consent")

    erased = await data_subject.EraseCustomerData(_erase(), metadata=consent)
    assert erased.service == "replenishment" and erased.erase_time.seconds > 1_700_000_000
    assert dict(erased.erased_records) == {
        "devices": 2,
        "slots": 3,
        "readings": 0,
        "slot_events": 3,  # two registrations and a deregistration
        "stored_responses": 2,
        "orders_cancelled": 0,
        "orders_pseudonymised": 0,
        "order_events_pseudonymised": 0,
    }
    assert await data_subject.EraseCustomerData(_erase(), metadata=consent) == erased
    later = await data_subject.EraseCustomerData(_erase(request_id="dsr-2"), metadata=service.auth())
    assert dict(later.erased_records) == {
        "devices": 0,
        "slots": 0,
        "readings": 0,
        "slot_events": 0,
        "stored_responses": 0,
        "orders_cancelled": 0,
        "orders_pseudonymised": 0,
        "order_events_pseudonymised": 0,
    }

    for device in (printer.device, filter_.device):
        error = await rpc_error(
            stub.GetDevice(pb.GetDeviceRequest(device_id=device.device_id), metadata=service.auth())
        )
        assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "DEVICE_NOT_FOUND"
    # The erased device's token authenticates no more.
    error = await rpc_error(
        devices.GetForecast(
            device_pb.GetForecastRequest(device_id=printer.device.device_id, slot_id="black"),
            metadata=(("authorization", f"Bearer {printer.device_token}"),),
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    # Someone else's device is untouched.
    kept = await stub.GetDevice(
        pb.GetDeviceRequest(device_id=other.device.device_id), metadata=service.auth()
    )
    assert kept.device == other.device

    exported = await data_subject.ExportCustomerData(_export(request_id="dsr-3"), metadata=consent)
    assert json_format.MessageToDict(exported.document)["held"] == {
        "devices": [],
        "readings": [],
        "slot_events": [],
        "stored_responses": [],
        "orders": [],
    }

    tables = _tables(database_url)
    erased_ids = {printer.device.device_id, filter_.device.device_id}
    assert [r for r in tables["devices"] if r["customer_id"] == CUSTOMER_ID] == []
    assert [r for r in tables["slots"] if r["device_id"] in erased_ids] == []
    assert {r["request_id"] for r in tables["idempotency"] if r["rpc"] == "RegisterDevice"} == {"reg-3"}
    # Nothing names the customer now, the erasures' own stored replies included.
    for name, rows in tables.items():
        for row in rows:
            assert not any(CUSTOMER_ID in str(value) for value in row.values()), (name, row)


async def test_a_request_id_reused_for_another_customer_is_refused(start_service):
    service, _, _, data_subject = await _replenishment(start_service)
    await data_subject.EraseCustomerData(_erase("c-1", "dsr-1"), metadata=service.auth())
    error = await rpc_error(data_subject.EraseCustomerData(_erase("c-2", "dsr-1"), metadata=service.auth()))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
    assert "request_id" in field_violations(error)


@pytest.mark.parametrize("principal", ["service:storefront", "service:crm", "service:fulfilment"])
async def test_only_admin_and_consent_may_call(start_service, principal):
    service, _, _, data_subject = await _replenishment(start_service)
    for call in (
        data_subject.ExportCustomerData(_export(), metadata=service.auth(principal)),
        data_subject.EraseCustomerData(_erase(), metadata=service.auth(principal)),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"


async def test_a_device_may_not_call(start_service):
    service, stub, _, data_subject = await _replenishment(start_service)
    registered = await stub.RegisterDevice(
        _registration("reg-1", "SN-1"), metadata=service.auth("service:crm")
    )
    as_device = (("authorization", f"Bearer {registered.device_token}"),)
    error = await rpc_error(data_subject.ExportCustomerData(_export(), metadata=as_device))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("customer_id", "request_id", "fields"),
    [
        ("", "dsr-1", {"customer_id"}),
        ("cus 42", "dsr-1", {"customer_id"}),
        ("c" * 129, "dsr-1", {"customer_id"}),
        ("cus_42", "", {"request_id"}),
        ("", "r" * 65, {"customer_id", "request_id"}),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(start_service, customer_id, request_id, fields):
    service, _, _, data_subject = await _replenishment(start_service)
    for call in (
        data_subject.ExportCustomerData(_export(customer_id, request_id), metadata=service.auth()),
        data_subject.EraseCustomerData(_erase(customer_id, request_id), metadata=service.auth()),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == fields


async def test_telemetry_slots_and_rotations_are_exported_and_erased_with_the_customer(
    start_service, database_url
):
    from google.protobuf import duration_pb2, timestamp_pb2

    service, stub, devices, data_subject = await _replenishment(start_service, database_url)
    storefront = service.auth("service:storefront")
    printer = await stub.RegisterDevice(
        _registration("reg-t", "SN-T", slots=[_slot("black")]), metadata=storefront
    )
    device_id = printer.device.device_id
    await stub.CreateSlot(
        pb.CreateSlotRequest(request_id="slot-t", device_id=device_id, slot=_slot("cyan")),
        metadata=storefront,
    )
    rotated = await stub.RotateDeviceToken(
        pb.RotateDeviceTokenRequest(
            request_id="rot-t", device_id=device_id, previous_token_grace=duration_pb2.Duration(seconds=3600)
        ),
        metadata=storefront,
    )
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    await devices.ReportTelemetry(
        device_pb.ReportTelemetryRequest(
            device_id=device_id,
            readings=[device_pb.Reading(reading_id="t-1", slot_id="black", level=100.0, measure_time=stamp)],
        ),
        metadata=(("authorization", f"Bearer {rotated.device_token}"),),
    )
    consent = service.auth("service:consent")
    held = json_format.MessageToDict(
        (await data_subject.ExportCustomerData(_export(), metadata=consent)).document
    )["held"]
    assert [r["reading_id"] for r in held["readings"]] == ["t-1"]
    assert {e["type"] for e in held["slot_events"]} == {"DEVICE_REGISTERED"}
    assert sorted(r["rpc"] for r in held["stored_responses"]) == [
        "CreateSlot",
        "RegisterDevice",
        "RotateDeviceToken",
    ]
    exported = str(held)
    for token in (printer.device_token, rotated.device_token):
        assert token not in exported and hash_token(token) not in exported

    erased = await data_subject.EraseCustomerData(_erase(), metadata=consent)
    assert erased.erased_records["readings"] == 1 and erased.erased_records["stored_responses"] == 3
    # Both tokens (the rotated one in its grace too) authenticate no more.
    for token in (printer.device_token, rotated.device_token):
        error = await rpc_error(
            devices.GetForecast(
                device_pb.GetForecastRequest(device_id=device_id, slot_id="black"),
                metadata=(("authorization", f"Bearer {token}"),),
            )
        )
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    tables = _tables(database_url)
    for name in ("devices", "slots", "readings", "slot_events", "idempotency"):
        assert not [row for row in tables[name] if device_id in str(row) or CUSTOMER_ID in str(row)], name
