"""Device registration, device tokens and access rules of the replenishment service, over real gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from shared.auth import hash_token
from shared.db import Database
from tests.conftest import error_reason, field_violations, rpc_error

HOUR = 3_600
DAY = 24 * HOUR


def _slot(slot_id: str = "black", **fields: object) -> pb.Slot:
    values: dict[str, object] = dict(slot_id=slot_id, item_id="ink-black-xl", capacity=250.0, unit="ml")
    values.update(fields)
    return pb.Slot(**values)  # type: ignore[arg-type]


def _registration(
    request_id: str = "reg-1", serial: str = "SN-0001", **fields: object
) -> pb.RegisterDeviceRequest:
    values: dict[str, object] = dict(
        request_id=request_id,
        customer_id="cus_42",
        manufacturer="acme",
        model="inkjet-200",
        kind="printer",
        serial_number=serial,
        display_name="Office printer",
        firmware_version="2.4.1",
        attributes={"location": "office"},
        slots=[
            _slot(
                "black",
                display_name="Black ink",
                reorder_quantity=2,
                unit_price_micros=24_990_000,
                currency_code="EUR",
                policy=pb.SLOT_POLICY_AUTO,
                lead_time=duration_pb2.Duration(seconds=2 * DAY),
                service_level=0.99,
                fallback_reorder_level=40.0,
                limits=pb.SlotLimits(
                    max_orders_per_period=2,
                    period=duration_pb2.Duration(seconds=7 * DAY),
                    max_spend_micros=60_000_000,
                    currency_code="EUR",
                ),
            ),
            _slot("color", item_id="ink-color", capacity=100.0),
        ],
    )
    values.update(fields)
    return pb.RegisterDeviceRequest(**values)  # type: ignore[arg-type]


async def _replenishment(start_service, database_url=None):
    service = await start_service("replenishment", database_url)
    return (
        service,
        pb_grpc.ReplenishmentServiceStub(service.channel),
        device_grpc.DeviceServiceStub(service.channel),
    )


def _device_auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def test_a_registered_device_is_stored_with_its_slots_and_survives_a_restart(
    start_service, database_url
):
    service, stub, devices = await _replenishment(start_service, database_url)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    device = registered.device
    assert registered.device_token and device.device_id.startswith("dev_")
    assert device.state == pb.DEVICE_STATE_ACTIVE
    assert (device.customer_id, device.manufacturer, device.model, device.kind, device.serial_number) == (
        "cus_42",
        "acme",
        "inkjet-200",
        "printer",
        "SN-0001",
    )
    assert device.attributes == {"location": "office"}
    assert device.create_time.seconds > 0 and device.token_create_time == device.create_time
    assert not device.HasField("deregister_time") and not device.HasField("last_seen_time")
    assert [s.slot_id for s in device.slots] == ["black", "color"]
    black, color = device.slots
    assert black.device_id == device.device_id and black.policy == pb.SLOT_POLICY_AUTO
    assert black.reorder_quantity == 2 and black.unit_price_micros == 24_990_000
    assert black.lead_time.seconds == 2 * DAY and black.limits.period.seconds == 7 * DAY
    assert black.limits.max_spend_micros == 60_000_000 and black.fallback_reorder_level == 40.0
    assert black.safety_z == pytest.approx(2.326, abs=1e-3)
    assert black.state.status == pb.SLOT_STATUS_NO_DATA
    # A new slot gets the documented defaults.
    assert color.policy == pb.SLOT_POLICY_NOTIFY_ONLY and color.reorder_quantity == 1
    assert color.lead_time.seconds == 3 * DAY and color.limits.period.seconds == 30 * DAY
    assert color.service_level == pytest.approx(0.95) and color.safety_z == pytest.approx(1.645, abs=1e-3)
    assert color.fallback_reorder_level == pytest.approx(20.0)

    fetched = await stub.GetDevice(
        pb.GetDeviceRequest(device_id=device.device_id), metadata=service.auth("service:crm")
    )
    assert fetched.device == device
    await service.running.stop(0)

    again, stub, devices = await _replenishment(start_service, database_url)
    fetched = await stub.GetDevice(pb.GetDeviceRequest(device_id=device.device_id), metadata=again.auth())
    assert fetched.device == device
    # The token still authenticates after the restart.
    answer = await devices.GetForecast(
        device_pb.GetForecastRequest(device_id=device.device_id, slot_id="black"),
        metadata=_device_auth(registered.device_token),
    )
    assert answer.forecast.status == device_pb.FORECAST_STATUS_INSUFFICIENT_DATA


async def test_a_test_device_is_marked_test_and_a_new_device_is_not_paused(start_service, database_url):
    service, stub, _ = await _replenishment(start_service, database_url)
    as_store = service.auth("service:store")
    test_device = await stub.RegisterDevice(
        _registration(request_id="reg-test", test=True), metadata=as_store
    )
    plain = await stub.RegisterDevice(_registration(request_id="reg-plain", serial="SN-2"), metadata=as_store)
    assert test_device.device.test and not plain.device.test
    assert not test_device.device.paused and not plain.device.paused
    fetched = await stub.GetDevice(
        pb.GetDeviceRequest(device_id=test_device.device.device_id), metadata=as_store
    )
    assert fetched.device.test


async def test_only_the_token_hash_is_stored(start_service, database_url):
    service, stub, _ = await _replenishment(start_service, database_url)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    database = Database(database_url, "replenishment")
    try:
        rows = database.transaction(
            lambda connection: [
                [str(value) for value in row]
                for table in ("devices", "slots", "idempotency")
                for row in connection.execute(sa.text(f"SELECT * FROM {table}"))  # noqa: S608
            ]
        )
    finally:
        database.close()
    stored = " ".join(" ".join(row) for row in rows)
    assert registered.device_token not in stored
    assert hash_token(registered.device_token) in stored


async def test_a_retry_returns_the_same_device_without_the_token(start_service, database_url):
    service, stub, _ = await _replenishment(start_service, database_url)
    request = _registration()
    first = await stub.RegisterDevice(request, metadata=service.auth("service:storefront"))
    retry = await stub.RegisterDevice(request, metadata=service.auth("service:storefront"))
    assert retry.device == first.device and first.device_token and retry.device_token == ""
    # Copies of one request racing each other still make one device, and show its token once.
    racing = _registration(request_id="reg-race", serial="SN-RACE")
    answers = await asyncio.gather(
        *(stub.RegisterDevice(racing, metadata=service.auth("service:storefront")) for _ in range(6))
    )
    assert len({a.device.device_id for a in answers}) == 1
    assert sum(1 for a in answers if a.device_token) == 1


async def test_a_second_active_device_with_the_same_serial_is_refused(start_service):
    service, stub, _ = await _replenishment(start_service)
    first = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    error = await rpc_error(
        stub.RegisterDevice(_registration(request_id="reg-2"), metadata=service.auth("service:storefront"))
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert error_reason(error) == "DEVICE_ALREADY_REGISTERED"
    # Another model may use the same serial number.
    other = await stub.RegisterDevice(
        _registration(request_id="reg-3", model="laser-9"), metadata=service.auth("service:storefront")
    )
    assert other.device.device_id != first.device.device_id


async def test_a_request_id_reused_for_a_different_request_is_refused(start_service):
    service, stub, _ = await _replenishment(start_service)
    await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    error = await rpc_error(
        stub.RegisterDevice(_registration(serial="SN-OTHER"), metadata=service.auth("service:storefront"))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(error) == "REQUEST_ID_REUSED" and "request_id" in field_violations(error)


def _slots_with(**fields: object) -> list[pb.Slot]:
    return [_slot(**fields)]  # type: ignore[arg-type]


INVALID_REGISTRATIONS: list[tuple[dict[str, Any], str]] = [
    ({"request_id": ""}, "request_id"),
    ({"request_id": "bad id!"}, "request_id"),
    ({"request_id": "r" * 65}, "request_id"),
    ({"customer_id": ""}, "customer_id"),
    ({"customer_id": "c" * 129}, "customer_id"),
    ({"customer_id": "cus\x00"}, "customer_id"),
    ({"manufacturer": ""}, "manufacturer"),
    ({"manufacturer": "m" * 65}, "manufacturer"),
    ({"model": " "}, "model"),
    ({"model": "m" * 65}, "model"),
    ({"kind": ""}, "kind"),
    ({"kind": "Printer"}, "kind"),
    ({"kind": "k" * 65}, "kind"),
    ({"serial_number": ""}, "serial_number"),
    ({"serial_number": "s" * 129}, "serial_number"),
    ({"display_name": "d" * 201}, "display_name"),
    ({"firmware_version": "f" * 65}, "firmware_version"),
    ({"attributes": {f"k{i}": "v" for i in range(33)}}, "attributes"),
    ({"attributes": {"k" * 65: "v"}}, f'attributes["{"k" * 65}"]'),
    ({"attributes": {"": "v"}}, 'attributes[""]'),
    ({"attributes": {"location": "v" * 257}}, 'attributes["location"]'),
    ({"slots": [_slot(f"s{i}") for i in range(33)]}, "slots"),
    ({"slots": [_slot("a"), _slot("b"), _slot("a")]}, "slots[2].slot_id"),
    ({"slots": _slots_with(slot_id="")}, "slots[0].slot_id"),
    ({"slots": _slots_with(slot_id="black ink")}, "slots[0].slot_id"),
    ({"slots": _slots_with(slot_id="s" * 65)}, "slots[0].slot_id"),
    ({"slots": _slots_with(display_name="d" * 201)}, "slots[0].display_name"),
    ({"slots": _slots_with(item_id="")}, "slots[0].item_id"),
    ({"slots": _slots_with(item_id="i" * 129)}, "slots[0].item_id"),
    ({"slots": _slots_with(capacity=0.0)}, "slots[0].capacity"),
    ({"slots": _slots_with(capacity=-1.0)}, "slots[0].capacity"),
    ({"slots": _slots_with(capacity=float("nan"))}, "slots[0].capacity"),
    ({"slots": _slots_with(capacity=float("inf"))}, "slots[0].capacity"),
    ({"slots": _slots_with(unit="")}, "slots[0].unit"),
    ({"slots": _slots_with(unit="u" * 17)}, "slots[0].unit"),
    ({"slots": _slots_with(reorder_quantity=101)}, "slots[0].reorder_quantity"),
    ({"slots": _slots_with(reorder_quantity=-1)}, "slots[0].reorder_quantity"),
    ({"slots": _slots_with(unit_price_micros=-1)}, "slots[0].unit_price_micros"),
    ({"slots": _slots_with(unit_price_micros=1, currency_code="")}, "slots[0].currency_code"),
    ({"slots": _slots_with(unit_price_micros=1, currency_code="eur")}, "slots[0].currency_code"),
    ({"slots": _slots_with(policy=pb.SLOT_POLICY_AUTO)}, "slots[0].unit_price_micros"),
    ({"slots": _slots_with(policy=pb.SLOT_POLICY_AUTO, unit_price_micros=1)}, "slots[0].currency_code"),
    ({"slots": _slots_with(policy=42)}, "slots[0].policy"),
    ({"slots": _slots_with(lead_time=duration_pb2.Duration(seconds=HOUR - 1))}, "slots[0].lead_time"),
    ({"slots": _slots_with(lead_time=duration_pb2.Duration(seconds=60 * DAY + 1))}, "slots[0].lead_time"),
    ({"slots": _slots_with(lead_time=duration_pb2.Duration(seconds=-DAY))}, "slots[0].lead_time"),
    ({"slots": _slots_with(service_level=0.4)}, "slots[0].service_level"),
    ({"slots": _slots_with(service_level=0.9991)}, "slots[0].service_level"),
    ({"slots": _slots_with(service_level=float("nan"))}, "slots[0].service_level"),
    ({"slots": _slots_with(fallback_reorder_level=-1.0)}, "slots[0].fallback_reorder_level"),
    ({"slots": _slots_with(fallback_reorder_level=251.0)}, "slots[0].fallback_reorder_level"),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(max_orders_per_period=1001))},
        "slots[0].limits.max_orders_per_period",
    ),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(max_orders_per_period=-1))},
        "slots[0].limits.max_orders_per_period",
    ),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(period=duration_pb2.Duration(seconds=HOUR - 1)))},
        "slots[0].limits.period",
    ),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(period=duration_pb2.Duration(seconds=367 * DAY)))},
        "slots[0].limits.period",
    ),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(max_spend_micros=-1))},
        "slots[0].limits.max_spend_micros",
    ),
    (
        {
            "slots": _slots_with(
                unit_price_micros=1, currency_code="EUR", limits=pb.SlotLimits(max_spend_micros=10)
            )
        },
        "slots[0].limits.currency_code",
    ),
    (
        {
            "slots": _slots_with(
                unit_price_micros=1,
                currency_code="EUR",
                limits=pb.SlotLimits(max_spend_micros=10, currency_code="USD"),
            )
        },
        "slots[0].limits.currency_code",
    ),
    (
        {"slots": _slots_with(limits=pb.SlotLimits(max_spend_micros=10, currency_code="EUR"))},
        "slots[0].unit_price_micros",
    ),
]


async def test_every_registration_field_is_checked(start_service):
    service, stub, _ = await _replenishment(start_service)
    for fields, field in INVALID_REGISTRATIONS:
        error = await rpc_error(
            stub.RegisterDevice(_registration(**fields), metadata=service.auth("service:storefront"))
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(error), (field, field_violations(error))
    # Nothing invalid was stored: the valid registration still goes through.
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    assert registered.device_token


async def test_limits_at_their_bounds_are_accepted(start_service):
    service, stub, _ = await _replenishment(start_service)
    slots = [
        _slot(
            f"s{i}",
            reorder_quantity=100,
            service_level=0.999 if i % 2 else 0.5,
            fallback_reorder_level=250.0,
            lead_time=duration_pb2.Duration(seconds=HOUR if i % 2 else 60 * DAY),
            limits=pb.SlotLimits(
                max_orders_per_period=1000,
                period=duration_pb2.Duration(seconds=HOUR if i % 2 else 366 * DAY),
            ),
        )
        for i in range(32)
    ]
    registered = await stub.RegisterDevice(
        _registration(
            customer_id="c" * 128,
            manufacturer="m" * 64,
            model="m" * 64,
            kind="k" * 64,
            serial_number="s" * 128,
            display_name="d" * 200,
            firmware_version="f" * 64,
            attributes={f"{i:0>64}": "v" * 256 for i in range(32)},
            slots=slots,
        ),
        metadata=service.auth(),
    )
    assert len(registered.device.slots) == 32 and len(registered.device.attributes) == 32


async def test_get_and_deregister_check_the_device_id(start_service):
    service, stub, _ = await _replenishment(start_service)
    for call, request in [
        (stub.GetDevice, pb.GetDeviceRequest(device_id="")),
        (stub.GetDevice, pb.GetDeviceRequest(device_id="no such id!")),
        (stub.DeregisterDevice, pb.DeregisterDeviceRequest(device_id="")),
    ]:
        error = await rpc_error(call(request, metadata=service.auth("service:storefront")))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "device_id" in field_violations(error)
    for call, request in [
        (stub.GetDevice, pb.GetDeviceRequest(device_id="dev_unknown")),
        (stub.DeregisterDevice, pb.DeregisterDeviceRequest(device_id="dev_unknown")),
    ]:
        error = await rpc_error(call(request, metadata=service.auth("service:storefront")))
        assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "DEVICE_NOT_FOUND"


async def test_a_device_token_opens_the_device_api_only(start_service):
    service, stub, devices = await _replenishment(start_service)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    device_id, token = registered.device.device_id, registered.device_token
    as_device = _device_auth(token)
    # Past authentication and authorisation: the RPC checks the request itself.
    for name, call in [
        (
            "Replenish",
            devices.Replenish(
                device_pb.ReplenishRequest(request_id="r", device_id=device_id), metadata=as_device
            ),
        ),
        (
            "ReportTelemetry",
            devices.ReportTelemetry(
                device_pb.ReportTelemetryRequest(device_id=device_id), metadata=as_device
            ),
        ),
        (
            "GetForecast",
            devices.GetForecast(device_pb.GetForecastRequest(device_id=device_id), metadata=as_device),
        ),
    ]:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    # The back-end API is not the device's.
    for call in [
        stub.GetDevice(pb.GetDeviceRequest(device_id=device_id), metadata=as_device),
        stub.ListDevices(pb.ListDevicesRequest(customer_id="cus_42"), metadata=as_device),
        stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=device_id), metadata=as_device),
        stub.RegisterDevice(_registration(request_id="dev-reg", serial="SN-9"), metadata=as_device),
    ]:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"
    # A token that was never issued does not authenticate.
    error = await rpc_error(
        devices.GetForecast(
            device_pb.GetForecastRequest(device_id=device_id), metadata=_device_auth(token + "x")
        )
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_principals_not_listed_are_refused(start_service):
    service, stub, devices = await _replenishment(start_service)
    for principal in ["service:fulfilment", "service:profile", "service:catalog"]:
        error = await rpc_error(stub.RegisterDevice(_registration(), metadata=service.auth(principal)))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, principal
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"
    error = await rpc_error(
        stub.GetDevice(pb.GetDeviceRequest(device_id="dev_x"), metadata=service.auth("service:fulfilment"))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    # Back ends do not call the device API; only devices and admin do.
    error = await rpc_error(
        devices.Replenish(
            device_pb.ReplenishRequest(device_id="dev_x"), metadata=service.auth("service:storefront")
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = await rpc_error(stub.RegisterDevice(_registration()))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_deregistering_revokes_the_token_and_frees_the_serial(start_service, database_url):
    service, stub, devices = await _replenishment(start_service, database_url)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    device_id, token = registered.device.device_id, registered.device_token
    retired = await stub.DeregisterDevice(
        pb.DeregisterDeviceRequest(device_id=device_id), metadata=service.auth("service:crm")
    )
    assert retired.device.state == pb.DEVICE_STATE_DEREGISTERED
    assert retired.device.HasField("deregister_time") and list(retired.cancelled_order_ids) == []
    assert [s.slot_id for s in retired.device.slots] == ["black", "color"]
    error = await rpc_error(
        devices.GetForecast(device_pb.GetForecastRequest(device_id=device_id), metadata=_device_auth(token))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    again = await stub.DeregisterDevice(
        pb.DeregisterDeviceRequest(device_id=device_id), metadata=service.auth("service:crm")
    )
    assert again.device == retired.device
    fetched = await stub.GetDevice(pb.GetDeviceRequest(device_id=device_id), metadata=service.auth())
    assert fetched.device == retired.device
    # The serial number is free again: the same device can be registered anew.
    renewed = await stub.RegisterDevice(
        _registration(request_id="reg-2"), metadata=service.auth("service:storefront")
    )
    assert renewed.device.device_id != device_id and renewed.device_token != token
    error = await rpc_error(
        devices.GetForecast(device_pb.GetForecastRequest(device_id=device_id), metadata=_device_auth(token))
    )
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
