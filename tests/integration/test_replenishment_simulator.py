"""The device simulator against real services: a consent service and a replenishment
service following it, in this process on loopback, with the simulator's own calls
(RegisterDevice, ReportTelemetry with the device tokens, WatchOrderEvents, ShipOrder,
DeliverOrder)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from services.demo_data import _device_request, register_demo_devices
from services.demo_generator import generate
from services.replenishment.simulator import (
    DeviceBook,
    Fulfilment,
    SimClock,
    Simulation,
    SimulationOptions,
    Stats,
    demo_start_level,
    parse_args,
    prepare_devices,
    register_devices,
    run_command,
    simulated_specs,
)
from services.replenishment.slots import DAY_US, HOUR_US

PURPOSE = "replenishment.automatic_ordering"


async def until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@pytest.fixture
async def suite(start_service, dev_tokens):
    consent = await start_service("consent")
    replenishment = await start_service(
        "replenishment",
        consent_address=f"127.0.0.1:{consent.running.port}",
        service_token=dev_tokens["service:replenishment"],
        replenishment_promotion_interval_seconds=0.1,
        replenishment_cancellation_window_seconds=0,
    )
    return consent, replenishment


async def grant(consent: Any, customers: list[str]) -> None:
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    for customer in customers:
        await stub.GrantConsent(
            consent_pb.GrantConsentRequest(
                customer_id=customer,
                purpose=PURPOSE,
                data_categories=["user.device.telemetry"],
                notice_version=1,
                collection_method=consent_pb.COLLECTION_METHOD_DEVICE,
                jurisdiction="JP",
                request_id=f"grant-{customer}",
            ),
            metadata=consent.auth("service:storefront"),
        )


async def test_registration_is_retry_safe_and_keeps_each_token_once(suite, dev_tokens, tmp_path):
    _, replenishment = suite
    book = DeviceBook(tmp_path / "devices.json")
    specs = simulated_specs(3, "c-")
    first = await register_devices(replenishment.channel, dev_tokens["service:storefront"], specs, book)
    assert len({c.device_id for c in first}) == 3 and all(c.token for c in first)
    again = await register_devices(
        replenishment.channel, dev_tokens["service:storefront"], specs, DeviceBook(tmp_path / "devices.json")
    )
    assert again == first  # the same devices and the kept tokens, no new registration
    # A lost device file: the devices are the same, with new tokens (RotateDeviceToken).
    lost = await register_devices(
        replenishment.channel, dev_tokens["service:storefront"], specs, DeviceBook(None)
    )
    assert [c.device_id for c in lost] == [c.device_id for c in first]
    assert all(new.token != old.token for new, old in zip(lost, first, strict=True))


async def test_fulfilment_ships_and_delivers_placed_orders_and_refills_the_slot(suite, dev_tokens):
    consent, replenishment = suite
    storefront = dev_tokens["service:storefront"]
    [device] = await register_devices(
        replenishment.channel, storefront, simulated_specs(1, "f-"), DeviceBook(None)
    )
    stub = pb_grpc.ReplenishmentServiceStub(replenishment.channel)
    placed = await stub.ReplenishSlot(
        pb.ReplenishSlotRequest(request_id="buy-1", device_id=device.device_id, slot_id="filter"),
        metadata=replenishment.auth("service:storefront"),
    )
    order_id = placed.order.order_id
    delivered: list[tuple[str, str]] = []
    stats = Stats()
    # A lead time of 3 days at 3 days a second: delivered about a second after shipping.
    fulfilment = Fulfilment(
        replenishment.channel,
        dev_tokens["service:fulfilment"],
        3 * 86_400.0,
        stats,
        lambda *s: delivered.append(s),
    )
    task = asyncio.create_task(fulfilment.run())
    try:
        await until(lambda: delivered)
    finally:
        task.cancel()
        await fulfilment.aclose()
    assert delivered == [(device.device_id, "filter")]
    order = (await stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=replenishment.auth())).order
    assert order.state == pb.ORDER_STATE_DELIVERED and order.tracking.carrier == "sim"
    assert stats.fulfilment == {"shipped": 1, "delivered": 1}
    del consent


async def test_simulated_devices_run_low_get_an_order_delivered_and_report_the_refill(suite, dev_tokens):
    consent, replenishment = suite
    storefront = dev_tokens["service:storefront"]
    credentials = await register_devices(
        replenishment.channel, storefront, simulated_specs(3, "s-"), DeviceBook(None)
    )
    await grant(consent, [c.customer_id for c in credentials])
    history_us = 10 * DAY_US
    clock = SimClock.replaying(history_us, speed=4 * 86_400.0)  # 10 days in 2.5 s, then live
    options = SimulationOptions(speed=clock.speed, reading_interval_us=4 * HOUR_US, min_call_seconds=0.05)
    devices = await prepare_devices(
        replenishment.channel,
        storefront,
        credentials,
        clock,
        options,
        start_level=demo_start_level(history_us),
    )
    simulation = Simulation(replenishment.channel, devices, clock, options, dev_tokens["service:fulfilment"])
    stop = asyncio.Event()
    run = asyncio.create_task(simulation.run(stop))
    try:
        # Each slot reaches its reorder point late in the replay: orders, then deliveries.
        await until(lambda: simulation.stats.fulfilment["delivered"] >= 1 or run.done(), timeout=60)
        await until(lambda: simulation.stats.readings["ACCEPTED"] > 100)
    finally:
        stop.set()
        stats = await run
    assert stats.outcomes["ORDER_PLACED"] >= 1, stats.summary()
    assert stats.readings.keys() <= {"ACCEPTED", "DUPLICATE"}, stats.summary()
    stub = pb_grpc.ReplenishmentServiceStub(replenishment.channel)
    orders = await stub.ListOrders(
        pb.ListOrdersRequest(customer_id=credentials[0].customer_id), metadata=replenishment.auth()
    )
    assert all(o.trigger == pb.ORDER_TRIGGER_AUTOMATIC for o in orders.orders)


async def test_the_command_registers_devices_and_streams_their_readings(suite, dev_tokens, tmp_path):
    _, replenishment = suite
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(dev_tokens))
    args = parse_args(
        [
            f"--address=127.0.0.1:{replenishment.running.port}",
            f"--devices-file={tmp_path / 'devices.json'}",
            f"--tokens-file={tokens_file}",
            "--register=2",
            "--stream",
            "--day-seconds=0.5",
            "--history-days=2",
            "--seconds=3",
        ]
    )
    stats = await run_command(args, asyncio.Event())
    book = DeviceBook(tmp_path / "devices.json")
    assert sorted(book.entries) == ["sim-00000", "sim-00001"]
    # Two devices, a reading every 2 simulated hours over 2 days (and then live): about 50 each.
    assert stats.readings["ACCEPTED"] >= 40 and set(stats.readings) == {"ACCEPTED"}, stats.summary()
    assert not stats.errors, stats.summary()
    stub = pb_grpc.ReplenishmentServiceStub(replenishment.channel)
    device = book.entries["sim-00000"].device_id
    slot = (
        await stub.GetSlot(
            pb.GetSlotRequest(device_id=device, slot_id="filter"), metadata=replenishment.auth()
        )
    ).slot
    assert slot.state.status != pb.SLOT_STATUS_NO_DATA and 0 < slot.state.level <= 100


async def test_demo_devices_are_registered_once_and_a_lost_demo_token_is_replaced(
    suite, dev_tokens, tmp_path
):
    _, replenishment = suite
    storefront = dev_tokens["service:storefront"]
    address = f"127.0.0.1:{replenishment.running.port}"
    stub = pb_grpc.ReplenishmentServiceStub(replenishment.channel)
    printer = await stub.RegisterDevice(_device_request(), metadata=replenishment.auth("service:storefront"))
    # A data directory from before the file named its devices: principal -> token.
    path = tmp_path / "demo-devices.json"
    path.write_text(json.dumps({f"device:{printer.device.device_id}": printer.device_token}))
    data = generate(1_767_225_600 * 1_000_000, customers=40)
    fleet = await asyncio.to_thread(
        register_demo_devices, address, storefront, tmp_path, data, (), printer.device.device_id
    )
    assert [d.name for d in fleet] == ["water-filter", "printer", "coffee-machine"]
    book = DeviceBook(path)
    assert set(book.entries) == {"aiko-printer", "water-filter", "printer", "coffee-machine"}
    new_token = book.entries["aiko-printer"].token
    assert new_token and new_token != printer.device_token
    device_stub = device_grpc.DeviceServiceStub(replenishment.channel)
    request = device_pb.GetForecastRequest(device_id=printer.device.device_id, slot_id="black")
    await device_stub.GetForecast(request, metadata=(("authorization", f"Bearer {new_token}"),))
    # Every start registers them again: the same devices and tokens.
    again = await asyncio.to_thread(
        register_demo_devices, address, storefront, tmp_path, data, (), printer.device.device_id
    )
    assert again == fleet and DeviceBook(path).entries == book.entries
