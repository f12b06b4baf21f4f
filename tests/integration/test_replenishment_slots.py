"""Slots, device settings, pause and resume, and the slot feed, over real gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from najimi.replenishment.v1 import replenishment_service_pb2 as pb

from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_replenishment_devices import _registration, _replenishment, _slot
from tests.integration.test_replenishment_telemetry import _device, _reading

DAY = 86_400


def _mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=paths)


async def test_slots_are_created_read_listed_updated_and_deleted(start_service, database_url):
    service, stub, _ = await _replenishment(start_service, database_url)
    crm = service.auth("service:crm")
    device = (await stub.RegisterDevice(_registration(), metadata=crm)).device
    device_id = device.device_id
    create = pb.CreateSlotRequest(
        request_id="slot-1",
        device_id=device_id,
        slot=_slot("yellow", capacity=80.0, expected_stock_after_delivery=75.0, policy=pb.SLOT_POLICY_OFF),
    )
    created = (await stub.CreateSlot(create, metadata=crm)).slot
    assert (created.slot_id, created.device_id, created.policy) == ("yellow", device_id, pb.SLOT_POLICY_OFF)
    assert created.expected_stock_after_delivery == 75.0 and created.state.status == pb.SLOT_STATUS_NO_DATA
    assert (await stub.CreateSlot(create, metadata=crm)).slot == created  # a retry
    error = await rpc_error(
        stub.CreateSlot(
            pb.CreateSlotRequest(request_id="slot-2", device_id=device_id, slot=_slot("yellow")), metadata=crm
        )
    )
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS and error_reason(error) == "SLOT_ALREADY_EXISTS"
    error = await rpc_error(
        stub.CreateSlot(
            pb.CreateSlotRequest(request_id="slot-3", device_id=device_id, slot=_slot("z", capacity=-1.0)),
            metadata=crm,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "slot.capacity" in field_violations(error)
    error = await rpc_error(
        stub.CreateSlot(
            pb.CreateSlotRequest(
                request_id="slot-4", device_id=device_id, slot=_slot("z", expected_stock_after_delivery=251.0)
            ),
            metadata=crm,
        )
    )
    assert "slot.expected_stock_after_delivery" in field_violations(error)

    # Listing pages through the slots by slot_id.
    first = await stub.ListSlots(pb.ListSlotsRequest(device_id=device_id, page_size=2), metadata=crm)
    assert [s.slot_id for s in first.slots] == ["black", "color"] and first.next_page_token
    second = await stub.ListSlots(
        pb.ListSlotsRequest(device_id=device_id, page_size=2, page_token=first.next_page_token), metadata=crm
    )
    assert [s.slot_id for s in second.slots] == ["yellow"] and not second.next_page_token
    error = await rpc_error(
        stub.ListSlots(
            pb.ListSlotsRequest(device_id="dev_other", page_size=2, page_token=first.next_page_token),
            metadata=crm,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_PAGE_TOKEN"

    # Updates change exactly the masked fields; the same update again changes nothing.
    update = pb.UpdateSlotRequest(
        slot=pb.Slot(
            device_id=device_id,
            slot_id="color",
            display_name="Colour",
            capacity=1.0,  # not in the mask: ignored
            lead_time=duration_pb2.Duration(seconds=5 * DAY),
            limits=pb.SlotLimits(max_orders_per_period=3),
        ),
        update_mask=_mask("display_name", "lead_time", "limits.max_orders_per_period"),
    )
    updated = (await stub.UpdateSlot(update, metadata=crm)).slot
    assert (updated.display_name, updated.lead_time.seconds, updated.capacity) == ("Colour", 5 * DAY, 100.0)
    assert updated.limits.max_orders_per_period == 3 and updated.limits.period.seconds == 30 * DAY
    assert (await stub.UpdateSlot(update, metadata=crm)).slot == updated
    for mask, field in [((), "update_mask"), (("slot_id",), "update_mask"), (("paused",), "update_mask")]:
        error = await rpc_error(
            stub.UpdateSlot(pb.UpdateSlotRequest(slot=update.slot, update_mask=_mask(*mask)), metadata=crm)
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(error), mask
    # The resulting slot is checked: AUTO needs a price.
    error = await rpc_error(
        stub.UpdateSlot(
            pb.UpdateSlotRequest(
                slot=pb.Slot(device_id=device_id, slot_id="color", policy=pb.SLOT_POLICY_AUTO),
                update_mask=_mask("policy"),
            ),
            metadata=crm,
        )
    )
    assert "slot.unit_price_micros" in field_violations(error)
    error = await rpc_error(
        stub.UpdateSlot(
            pb.UpdateSlotRequest(
                slot=pb.Slot(device_id=device_id, slot_id="nope"), update_mask=_mask("unit")
            ),
            metadata=crm,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "SLOT_NOT_FOUND"

    # Delete: retry-safe only with allow_missing.
    delete = pb.DeleteSlotRequest(device_id=device_id, slot_id="yellow")
    assert await stub.DeleteSlot(delete, metadata=crm) == pb.DeleteSlotResponse()
    error = await rpc_error(stub.DeleteSlot(delete, metadata=crm))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "SLOT_NOT_FOUND"
    missing = pb.DeleteSlotRequest(device_id=device_id, slot_id="yellow", allow_missing=True)
    assert await stub.DeleteSlot(missing, metadata=crm) == pb.DeleteSlotResponse()
    missing_device = pb.DeleteSlotRequest(device_id="dev_gone", slot_id="x", allow_missing=True)
    assert await stub.DeleteSlot(missing_device, metadata=crm) == pb.DeleteSlotResponse()
    error = await rpc_error(
        stub.GetSlot(pb.GetSlotRequest(device_id=device_id, slot_id="yellow"), metadata=crm)
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    # A retired device's slots cannot change.
    await stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=device_id), metadata=crm)
    error = await rpc_error(stub.UpdateSlot(update, metadata=crm))
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "DEVICE_DEREGISTERED"
    )


async def test_devices_are_listed_newest_first_per_customer_and_updated(start_service):
    service, stub, _ = await _replenishment(start_service)
    store = service.auth("service:store")
    ids = []
    for index in range(5):
        registered = await stub.RegisterDevice(
            _registration(request_id=f"reg-{index}", serial=f"SN-{index}"), metadata=store
        )
        ids.append(registered.device.device_id)
    await stub.RegisterDevice(
        _registration(request_id="reg-x", serial="SN-X", customer_id="cus_other"), metadata=store
    )
    await stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=ids[0]), metadata=store)
    listed, token = [], ""
    while True:
        page = await stub.ListDevices(
            pb.ListDevicesRequest(customer_id="cus_42", page_size=2, page_token=token), metadata=store
        )
        listed += [d.device_id for d in page.devices]
        token = page.next_page_token
        if not token:
            break
    assert listed == ids[:0:-1]  # newest first, the retired one left out
    every = await stub.ListDevices(
        pb.ListDevicesRequest(customer_id="cus_42", show_deregistered=True), metadata=store
    )
    assert [d.device_id for d in every.devices] == ids[::-1]
    error = await rpc_error(stub.ListDevices(pb.ListDevicesRequest(), metadata=store))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "CUSTOMER_ID_REQUIRED"
    assert len((await stub.ListDevices(pb.ListDevicesRequest(), metadata=service.auth())).devices) == 5
    page = await stub.ListDevices(pb.ListDevicesRequest(customer_id="cus_42", page_size=1), metadata=store)
    error = await rpc_error(
        stub.ListDevices(
            pb.ListDevicesRequest(
                customer_id="cus_42", show_deregistered=True, page_token=page.next_page_token
            ),
            metadata=store,
        )
    )
    assert error_reason(error) == "INVALID_PAGE_TOKEN"

    update = pb.UpdateDeviceRequest(
        device=pb.Device(
            device_id=ids[1], display_name="Den printer", serial_number="ignored", attributes={"floor": "2"}
        ),
        update_mask=_mask("display_name", "attributes"),
    )
    updated = (await stub.UpdateDevice(update, metadata=store)).device
    assert (updated.display_name, dict(updated.attributes), updated.serial_number) == (
        "Den printer",
        {"floor": "2"},
        "SN-1",
    )
    assert (await stub.UpdateDevice(update, metadata=store)).device == updated
    for mask, values in [
        ((), {}),
        (("serial_number",), {}),
        (("display_name",), {"display_name": "x" * 201}),
    ]:
        bad = pb.UpdateDeviceRequest(device=pb.Device(device_id=ids[1], **values), update_mask=_mask(*mask))
        error = await rpc_error(stub.UpdateDevice(bad, metadata=store))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, mask
    error = await rpc_error(
        stub.UpdateDevice(
            pb.UpdateDeviceRequest(device=pb.Device(device_id=ids[0]), update_mask=_mask("display_name")),
            metadata=store,
        )
    )
    assert error_reason(error) == "DEVICE_DEREGISTERED"


async def test_pause_and_resume_are_idempotent_and_on_the_slot_feed(start_service):
    device = await _device(start_service)
    stub, crm = device.stub, device.service.auth("service:crm")
    device_id = device.device_id
    paused = (await stub.PauseDevice(pb.PauseDeviceRequest(device_id=device_id), metadata=crm)).device
    assert paused.paused
    assert (await stub.PauseDevice(pb.PauseDeviceRequest(device_id=device_id), metadata=crm)).device == paused
    slot = (
        await stub.PauseSlot(pb.PauseSlotRequest(device_id=device_id, slot_id="black"), metadata=crm)
    ).slot
    assert slot.paused
    await stub.PauseSlot(pb.PauseSlotRequest(device_id=device_id, slot_id="black"), metadata=crm)
    # A paused device keeps reporting.
    assert (await device.report(_reading("p1", 100.0))).results[0].status == 1
    resumed = (await stub.ResumeDevice(pb.ResumeDeviceRequest(device_id=device_id), metadata=crm)).device
    assert not resumed.paused and resumed.slots[0].paused  # the slot's own pause stays
    await stub.ResumeDevice(pb.ResumeDeviceRequest(device_id=device_id), metadata=crm)
    slot = (
        await stub.ResumeSlot(pb.ResumeSlotRequest(device_id=device_id, slot_id="black"), metadata=crm)
    ).slot
    assert not slot.paused
    events = await device.events(pb.SLOT_EVENT_TYPE_PAUSED, pb.SLOT_EVENT_TYPE_RESUMED)
    assert [(e.type, e.slot_id) for e in events] == [
        (pb.SLOT_EVENT_TYPE_PAUSED, ""),
        (pb.SLOT_EVENT_TYPE_PAUSED, "black"),
        (pb.SLOT_EVENT_TYPE_RESUMED, ""),
        (pb.SLOT_EVENT_TYPE_RESUMED, "black"),
    ]
    error = await rpc_error(
        stub.PauseSlot(pb.PauseSlotRequest(device_id=device_id, slot_id="nope"), metadata=crm)
    )
    assert error_reason(error) == "SLOT_NOT_FOUND"
    error = await rpc_error(stub.PauseDevice(pb.PauseDeviceRequest(device_id="dev_none"), metadata=crm))
    assert error_reason(error) == "DEVICE_NOT_FOUND"


async def test_the_slot_feed_lists_in_pages_and_watches_live(start_service):
    device = await _device(start_service)
    stub, storefront = device.stub, device.service.auth("service:storefront")
    for _ in range(4):
        await device.stub.PauseSlot(
            pb.PauseSlotRequest(device_id=device.device_id, slot_id="black"), metadata=storefront
        )
        await device.stub.ResumeSlot(
            pb.ResumeSlotRequest(device_id=device.device_id, slot_id="black"), metadata=storefront
        )
    request = pb.ListSlotEventsRequest(customer_id="cus_42", page_size=3)
    first = await stub.ListSlotEvents(request, metadata=storefront)
    assert [e.revision for e in first.events] == [1, 2, 3] and first.current_revision == 9
    assert first.events[0].type == pb.SLOT_EVENT_TYPE_DEVICE_REGISTERED
    revisions = [e.revision for e in first.events]
    token = first.next_page_token
    while token:
        page = await stub.ListSlotEvents(
            pb.ListSlotEventsRequest(customer_id="cus_42", page_size=3, page_token=token), metadata=storefront
        )
        revisions += [e.revision for e in page.events]
        token = page.next_page_token
    assert revisions == list(range(1, 10))
    # Tokens are bound to the filters; a forged one is refused.
    for changed in [
        pb.ListSlotEventsRequest(customer_id="cus_other", page_size=3, page_token=first.next_page_token),
        pb.ListSlotEventsRequest(
            customer_id="cus_42", page_size=3, since_revision=1, page_token=first.next_page_token
        ),
        pb.ListSlotEventsRequest(customer_id="cus_42", page_token=first.next_page_token[:-2] + "AA"),
        pb.ListSlotEventsRequest(customer_id="cus_42", page_token="not-a-token"),
    ]:
        error = await rpc_error(stub.ListSlotEvents(changed, metadata=storefront))
        assert (
            error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_PAGE_TOKEN"
        )
    for bad, reason in [
        (pb.ListSlotEventsRequest(), "FILTER_REQUIRED"),
        (pb.ListSlotEventsRequest(customer_id="cus_42", since_revision=-1), None),
        (pb.ListSlotEventsRequest(customer_id="cus_42", types=[99]), None),
    ]:
        error = await rpc_error(stub.ListSlotEvents(bad, metadata=storefront))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        if reason:
            assert error_reason(error) == reason
    error = await rpc_error(
        stub.ListSlotEvents(
            pb.ListSlotEventsRequest(customer_id="cus_42", since_revision=99), metadata=storefront
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_AHEAD"
    # Admin may read the whole feed; types filter.
    paused = await stub.ListSlotEvents(
        pb.ListSlotEventsRequest(types=[pb.SLOT_EVENT_TYPE_PAUSED]), metadata=device.service.auth()
    )
    assert len(paused.events) == 4

    # Watch: the replay after a revision, a heartbeat, then live events.
    watch = stub.WatchSlotEvents(
        pb.WatchSlotEventsRequest(
            device_id=device.device_id, since_revision=7, heartbeat_interval=duration_pb2.Duration(seconds=1)
        ),
        metadata=storefront,
    )
    stream = watch.__aiter__()

    async def next_message() -> Any:
        return await asyncio.wait_for(stream.__anext__(), 10)

    replay = [await next_message(), await next_message()]
    assert [m.event.revision for m in replay] == [8, 9]
    heartbeat = await next_message()
    assert heartbeat.WhichOneof("kind") == "heartbeat" and heartbeat.heartbeat.current_revision == 9
    await device.report(_reading("w1", 30.0))  # LOW (fallback reorder level 40)
    live = await next_message()
    while live.WhichOneof("kind") == "heartbeat":
        live = await next_message()
    assert (live.event.revision, live.event.type, live.event.level) == (10, pb.SLOT_EVENT_TYPE_LOW, 30.0)
    # Then the decision's event (this AUTO slot has no consent here), and when idle, heartbeats.
    idle = await next_message()
    last = live.event.revision
    while idle.WhichOneof("kind") == "event":
        assert idle.event.revision == last + 1
        last = idle.event.revision
        idle = await next_message()
    assert idle.heartbeat.current_revision == last
    watch.cancel()
    error = await rpc_error(
        _first(
            stub.WatchSlotEvents(
                pb.WatchSlotEventsRequest(
                    customer_id="cus_42", heartbeat_interval=duration_pb2.Duration(seconds=61)
                ),
                metadata=storefront,
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "heartbeat_interval" in field_violations(
        error
    )


async def _first(call: Any) -> Any:
    async for message in call:
        return message
    return None


@pytest.mark.parametrize("principal", ["service:fulfilment", "service:profile"])
async def test_the_slot_feed_is_not_for_other_services(start_service, principal):
    service, stub, _ = await _replenishment(start_service)
    error = await rpc_error(
        stub.ListSlotEvents(pb.ListSlotEventsRequest(customer_id="cus_42"), metadata=service.auth(principal))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_slot_shows_its_open_order_and_the_period_s_orders_and_spend(start_service, database_url):
    service, stub, _ = await _replenishment(start_service, database_url)
    crm = service.auth("service:crm")
    device_id = (await stub.RegisterDevice(_registration(), metadata=crm)).device.device_id
    placed = await stub.ReplenishSlot(
        pb.ReplenishSlotRequest(request_id="buy-1", device_id=device_id, slot_id="black"), metadata=crm
    )
    assert placed.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    slot = (await stub.GetSlot(pb.GetSlotRequest(device_id=device_id, slot_id="black"), metadata=crm)).slot
    assert slot.state.open_order_id == placed.order.order_id
    assert (slot.state.orders_in_period, slot.state.spend_in_period_micros) == (1, 2 * 24_990_000)
    listed = await stub.ListDevices(pb.ListDevicesRequest(customer_id="cus_42"), metadata=crm)
    assert listed.devices[0].slots[0].state == slot.state
    await stub.CancelOrder(
        pb.CancelOrderRequest(order_id=placed.order.order_id, request_id="cancel-1"), metadata=crm
    )
    slot = (await stub.GetSlot(pb.GetSlotRequest(device_id=device_id, slot_id="black"), metadata=crm)).slot
    assert (slot.state.open_order_id, slot.state.orders_in_period, slot.state.spend_in_period_micros) == (
        "",
        0,
        0,
    )


async def test_slot_events_past_the_retention_are_compacted(start_service, database_url):
    from services.replenishment import slot_events
    from shared.db import Database, now_micros

    device = await _device(start_service, database_url)
    stub, storefront = device.stub, device.service.auth("service:storefront")
    for _ in range(2):
        await stub.PauseSlot(
            pb.PauseSlotRequest(device_id=device.device_id, slot_id="black"), metadata=storefront
        )
        await stub.ResumeSlot(
            pb.ResumeSlotRequest(device_id=device.device_id, slot_id="black"), metadata=storefront
        )
    database = Database(database_url, "replenishment")
    try:
        # Everything up to now is past a retention that ends now: the first three go, in pages of 3.
        assert database.transaction(lambda c: slot_events.purge_before(c, now_micros(), limit=3)) == 3
    finally:
        database.close()
    request = pb.ListSlotEventsRequest(device_id=device.device_id, since_revision=2)
    error = await rpc_error(stub.ListSlotEvents(request, metadata=storefront))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_COMPACTED"
    error = await rpc_error(
        _first(
            stub.WatchSlotEvents(
                pb.WatchSlotEventsRequest(device_id=device.device_id, since_revision=1), metadata=storefront
            )
        )
    )
    assert error_reason(error) == "REVISION_COMPACTED"
    # From 0 (the oldest kept) or from the purge point on, nothing is missing.
    for since in (0, 3):
        page = await stub.ListSlotEvents(
            pb.ListSlotEventsRequest(device_id=device.device_id, since_revision=since), metadata=storefront
        )
        assert [e.revision for e in page.events] == [4, 5]
