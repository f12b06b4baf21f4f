"""Telemetry over real gRPC: every reading rule, refills, slot status events, outcomes,
the telemetry stream and its rate limit, and device tokens as the device API sees them."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.v1 import replenishment_service_pb2 as pb

from shared import metrics
from shared.db import Database
from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_replenishment_devices import _device_auth, _registration

MINUTE = 60
DAY = 86_400
ACCEPTED, DUPLICATE, REJECTED = (
    device_pb.READING_STATUS_ACCEPTED,
    device_pb.READING_STATUS_DUPLICATE,
    device_pb.READING_STATUS_REJECTED,
)


def _at(seconds_from_now: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int((time.time() + seconds_from_now) * 1e9))
    return stamp


def _reading(reading_id: str, level: float, ago: float = 0.0, slot_id: str = "black") -> device_pb.Reading:
    return device_pb.Reading(reading_id=reading_id, slot_id=slot_id, level=level, measure_time=_at(-ago))


class Device:
    """A registered device (black: 250 ml, fallback reorder level 40; color: 100 ml)."""

    def __init__(self, service: Any, stub: Any, devices: Any, registered: pb.RegisterDeviceResponse):
        self.service, self.stub, self.devices = service, stub, devices
        self.device_id = registered.device.device_id
        self.token = registered.device_token
        self.auth = _device_auth(self.token)

    async def report(self, *readings: device_pb.Reading, **kwargs: Any) -> device_pb.ReportTelemetryResponse:
        request = device_pb.ReportTelemetryRequest(device_id=self.device_id, readings=readings)
        return await self.devices.ReportTelemetry(request, metadata=kwargs.get("metadata", self.auth))

    async def slot(self, slot_id: str = "black") -> pb.Slot:
        found = await self.stub.GetSlot(
            pb.GetSlotRequest(device_id=self.device_id, slot_id=slot_id), metadata=self.service.auth()
        )
        return found.slot

    async def events(self, *types: int) -> list[pb.SlotEvent]:
        page = await self.stub.ListSlotEvents(
            pb.ListSlotEventsRequest(device_id=self.device_id, types=types, page_size=1000),
            metadata=self.service.auth("service:storefront"),
        )
        return list(page.events)


async def _device(start_service: Any, database_url: str | None = None, **settings: Any) -> Device:
    service = await start_service("replenishment", database_url, **settings)
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
    from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

    stub = pb_grpc.ReplenishmentServiceStub(service.channel)
    devices = device_grpc.DeviceServiceStub(service.channel)
    registered = await stub.RegisterDevice(_registration(), metadata=service.auth("service:storefront"))
    return Device(service, stub, devices, registered)


def _stored_readings(database_url: str, device_id: str) -> list[tuple[str, float, int, bool]]:
    database = Database(database_url, "replenishment")
    try:
        return database.transaction(
            lambda c: [
                (r.reading_id, r.level, r.epoch, r.refill)
                for r in c.execute(
                    sa.text(
                        "SELECT reading_id, level, epoch, refill FROM readings WHERE device_id = :d "
                        "ORDER BY measure_time_us"
                    ),
                    {"d": device_id},
                )
            ]
        )
    finally:
        database.close()


async def test_a_reading_sent_again_is_a_duplicate_and_stored_once(start_service, database_url):
    device = await _device(start_service, database_url)
    first = await device.report(_reading("r1", 200.0, ago=60), _reading("c1", 80.0, slot_id="color"))
    assert [r.status for r in first.results] == [ACCEPTED, ACCEPTED]
    # One outcome per slot touched, by slot_id, with the slot's level.
    assert [(o.slot_id, o.level) for o in first.slot_outcomes] == [("black", 200.0), ("color", 80.0)]
    # black is AUTO and no consent service runs here: fail closed; color (NOTIFY_ONLY) is full.
    assert [o.outcome for o in first.slot_outcomes] == [
        device_pb.REPLENISH_OUTCOME_CONSENT_REQUIRED,
        device_pb.REPLENISH_OUTCOME_NOT_NEEDED,
    ]
    again = await device.report(_reading("r1", 190.0, ago=30), _reading("r2", 195.0), _reading("r2", 1.0))
    assert [(r.reading_id, r.status, r.reason) for r in again.results] == [
        ("r1", DUPLICATE, ""),
        ("r2", ACCEPTED, ""),
        ("r2", REJECTED, "DUPLICATE_IN_BATCH"),
    ]
    assert [o.slot_id for o in again.slot_outcomes] == ["black"]
    stored = _stored_readings(database_url, device.device_id)
    assert [(r[0], r[1]) for r in stored if r[0].startswith("r")] == [("r1", 200.0), ("r2", 195.0)]
    # Copies of one batch racing each other store it once.
    batch = [_reading(f"race-{i}", 190.0 - i, ago=20 - i) for i in range(10)]
    answers = await asyncio.gather(*(device.report(*batch) for _ in range(6)))
    accepted = [sum(r.status == ACCEPTED for r in answer.results) for answer in answers]
    assert sorted(accepted) == [0, 0, 0, 0, 0, 10]
    assert len([r for r in _stored_readings(database_url, device.device_id) if r[0].startswith("race")]) == 10


REJECTIONS: list[tuple[dict[str, Any], str, str]] = [
    ({"reading_id": ""}, "reading_id", "INVALID_ID"),
    ({"reading_id": "no spaces"}, "reading_id", "INVALID_ID"),
    ({"reading_id": "r" * 65}, "reading_id", "INVALID_ID"),
    ({"slot_id": "magenta"}, "slot_id", "UNKNOWN_SLOT"),
    ({"slot_id": ""}, "slot_id", "INVALID_ID"),
    ({"level": -0.5}, "level", "LEVEL_NEGATIVE"),
    ({"level": 253.0}, "level", "LEVEL_ABOVE_CAPACITY"),
    ({"level": math.nan}, "level", "LEVEL_NOT_FINITE"),
    ({"level": math.inf}, "level", "LEVEL_NOT_FINITE"),
    ({"measure_time": None}, "measure_time", "MEASURE_TIME_MISSING"),
    ({"measure_time": timestamp_pb2.Timestamp(seconds=1, nanos=-1)}, "measure_time", "MEASURE_TIME_MISSING"),
    # Offsets from now, made into timestamps when the test runs.
    ({"measure_time": 6 * MINUTE}, "measure_time", "MEASURE_TIME_IN_FUTURE"),
    ({"measure_time": -31 * DAY}, "measure_time", "MEASURE_TIME_TOO_OLD"),
]


async def test_each_rule_rejects_its_reading_with_the_field_and_the_batch_goes_on(start_service):
    device = await _device(start_service)
    readings = []
    for index, (fields, _, _) in enumerate(REJECTIONS):
        values: dict[str, Any] = {
            "reading_id": f"bad-{index}",
            "slot_id": "black",
            "level": 100.0,
            "measure_time": _at(-1),
        }
        values.update(fields)
        if values["measure_time"] is None:
            del values["measure_time"]
        elif isinstance(values["measure_time"], int):
            values["measure_time"] = _at(values["measure_time"])
        readings.append(device_pb.Reading(**values))
    # Within the bounds: 1 % above capacity, 4 minutes ahead, 29 days old.
    readings += [
        device_pb.Reading(reading_id="ok-1", slot_id="black", level=252.0, measure_time=_at(-29 * DAY)),
        device_pb.Reading(reading_id="ok-2", slot_id="black", level=0.0, measure_time=_at(4 * MINUTE)),
    ]
    answer = await device.report(*readings)
    for result, (_, field, reason) in zip(answer.results, REJECTIONS, strict=False):
        assert (result.status, result.field, result.reason) == (REJECTED, field, reason), result
        assert result.description
    assert [r.status for r in answer.results[-2:]] == [ACCEPTED, ACCEPTED]
    assert (await device.slot()).state.level == 0.0
    # An empty batch, or more than 1000 readings, is the request's fault.
    for batch in ([], [_reading(f"n{i}", 1.0) for i in range(1001)]):
        error = await rpc_error(device.report(*batch))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "readings" in field_violations(error)


async def test_late_readings_take_their_place_by_measure_time(start_service, database_url):
    device = await _device(start_service, database_url)
    await device.report(_reading("new", 150.0, ago=60))
    # An older reading arriving later does not become the level.
    answer = await device.report(_reading("old", 170.0, ago=3600))
    assert answer.results[0].status == ACCEPTED and not answer.results[0].refill_detected
    slot = await device.slot()
    assert slot.state.level == 150.0 and slot.state.status == pb.SLOT_STATUS_OK
    assert abs(slot.state.level_time.seconds - (time.time() - 60)) < 5
    # The epoch started with the earliest reading.
    assert abs(slot.state.epoch_start_time.seconds - (time.time() - 3600)) < 5
    assert [r[0] for r in _stored_readings(database_url, device.device_id)] == ["old", "new"]


async def test_a_rise_above_a_tenth_of_capacity_is_a_refill_and_starts_an_epoch(start_service, database_url):
    device = await _device(start_service, database_url)
    answer = await device.report(
        _reading("a", 200.0, ago=400),
        _reading("b", 120.0, ago=300),
        _reading("c", 140.0, ago=200),  # +20 ml: noise, not a refill (10 % is 25 ml)
        _reading("d", 248.0, ago=100),  # a new cartridge
    )
    assert [r.refill_detected for r in answer.results] == [False, False, False, True]
    slot = await device.slot()
    assert slot.state.level == 248.0 and abs(slot.state.last_refill_time.seconds - (time.time() - 100)) < 5
    assert slot.state.epoch_start_time == slot.state.last_refill_time
    refills = await device.events(pb.SLOT_EVENT_TYPE_REFILLED)
    assert [(e.slot_id, e.level) for e in refills] == [("black", 248.0)]
    assert [(r[0], r[2], r[3]) for r in _stored_readings(database_url, device.device_id)] == [
        ("a", 0, False),
        ("b", 0, False),
        ("c", 0, False),
        ("d", 1, True),
    ]
    # A late reading between the refill and the one before it rises too: the refill happened
    # before it, so it moves there; no second REFILLED event.
    late = await device.report(_reading("late", 245.0, ago=150))
    assert late.results[0].refill_detected
    assert [(r[0], r[2], r[3]) for r in _stored_readings(database_url, device.device_id)][-2:] == [
        ("late", 1, True),
        ("d", 1, False),
    ]
    assert len(await device.events(pb.SLOT_EVENT_TYPE_REFILLED)) == 1
    # A late spike inside an epoch is no refill.
    spike = await device.report(_reading("spike", 240.0, ago=350))
    assert not spike.results[0].refill_detected


async def test_low_and_empty_are_slot_events_on_a_change_only(start_service):
    device = await _device(start_service)
    for index, level in enumerate([100.0, 35.0, 30.0, 20.0, 0.0, 0.0, 250.0, 30.0]):
        await device.report(_reading(f"r{index}", level, ago=100 - index))
        if index == 1:
            assert (await device.slot()).state.status == pb.SLOT_STATUS_LOW
    events = await device.events(
        pb.SLOT_EVENT_TYPE_LOW, pb.SLOT_EVENT_TYPE_EMPTY, pb.SLOT_EVENT_TYPE_REFILLED
    )
    assert [(e.type, e.level) for e in events] == [
        (pb.SLOT_EVENT_TYPE_LOW, 35.0),
        (pb.SLOT_EVENT_TYPE_EMPTY, 0.0),
        (pb.SLOT_EVENT_TYPE_REFILLED, 250.0),
        (pb.SLOT_EVENT_TYPE_LOW, 30.0),
    ]
    assert all(e.customer_id == "cus_42" and e.slot_id == "black" for e in events)
    assert (await device.slot()).state.status == pb.SLOT_STATUS_LOW


async def test_low_follows_the_forecasts_reorder_point_once_there_is_one(start_service):
    """Daily readings with known use. Black (250 ml, fallback 40, lead time 2 days): 20 ml a
    day, so the reorder point is 20 x (2 + 1 day between readings) = 60 ml and 58 ml is LOW
    though above the fallback. Color (100 ml, fallback 20, lead time 3 days): 2 ml a day, a
    reorder point of 2 x (3 + 1) = 8 ml, so 18 ml is OK though below the fallback."""
    device = await _device(start_service)
    black = [200.0 - 20.0 * day for day in range(7)]  # 200 ... 80, then 58 today
    color = [40.0 - 2.0 * day for day in range(11)]  # 40 ... 20, then 18 today
    for day, level in enumerate(black):
        await device.report(_reading(f"b{day}", level, ago=(7 - day) * DAY))
    for day, level in enumerate(color):
        await device.report(_reading(f"c{day}", level, ago=(11 - day) * DAY, slot_id="color"))
    assert (await device.slot("black")).state.status == pb.SLOT_STATUS_OK
    forecast = await device.stub.GetSlotForecast(
        pb.GetSlotForecastRequest(device_id=device.device_id, slot_id="black"), metadata=device.service.auth()
    )
    assert forecast.forecast.reorder_point == pytest.approx(60.0, abs=1.0)
    await device.report(_reading("b-now", 58.0), _reading("c-now", 18.0, slot_id="color"))
    assert (await device.slot("black")).state.status == pb.SLOT_STATUS_LOW
    assert (await device.slot("color")).state.status == pb.SLOT_STATUS_OK
    low = await device.events(pb.SLOT_EVENT_TYPE_LOW)
    assert [(e.slot_id, e.level) for e in low] == [("black", 58.0)]


def _retry_delay(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    return -1.0


async def test_the_stream_answers_each_message_and_ends_beyond_the_rate(start_service):
    # 100 readings a second: a bucket of 1000 (the minimum), enough for one full batch.
    device = await _device(start_service, replenishment_telemetry_readings_per_second=100)

    async def messages():
        yield device_pb.StreamTelemetryRequest(
            device_id=device.device_id, readings=[_reading("s1", 200.0, ago=9)]
        )
        yield device_pb.StreamTelemetryRequest(readings=[_reading("s1", 200.0, ago=9), _reading("s2", 190.0)])
        yield device_pb.StreamTelemetryRequest(
            device_id=device.device_id, readings=[_reading(f"b{i}", 190.0, ago=1) for i in range(1000)]
        )

    call = device.devices.StreamTelemetry(messages(), metadata=device.auth)
    answers = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            answers.append(answer)
    assert [[r.status for r in a.results] for a in answers] == [[ACCEPTED], [DUPLICATE, ACCEPTED]]
    assert [o.level for o in answers[1].slot_outcomes] == [190.0]
    error = caught.value
    assert (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        and error_reason(error) == "TELEMETRY_RATE_EXCEEDED"
    )
    assert 0 < _retry_delay(error) <= 10.1
    # The readings of the answered messages are stored; the refused one's are not.
    assert (await device.slot()).state.level == 190.0


async def test_the_stream_checks_the_device_of_each_message(start_service):
    device = await _device(start_service)
    other = await device.stub.RegisterDevice(
        _registration(request_id="reg-other", serial="SN-OTHER"),
        metadata=device.service.auth("service:store"),
    )

    async def naming(*device_ids: str):
        for index, device_id in enumerate(device_ids):
            yield device_pb.StreamTelemetryRequest(
                device_id=device_id, readings=[_reading(f"x{index}", 100.0)]
            )

    async def drain(call: Any) -> list[Any]:
        return [answer async for answer in call]

    error = await rpc_error(
        drain(device.devices.StreamTelemetry(naming(other.device.device_id), metadata=device.auth))
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "DEVICE_MISMATCH"
    error = await rpc_error(
        drain(
            device.devices.StreamTelemetry(
                naming(device.device_id, other.device.device_id), metadata=device.auth
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "device_id" in field_violations(error)
    # ReportTelemetry, Replenish and GetForecast naming another device are refused before anything else.
    for call in [
        device.devices.ReportTelemetry(
            device_pb.ReportTelemetryRequest(device_id=other.device.device_id, readings=[_reading("y", 1.0)]),
            metadata=device.auth,
        ),
        device.devices.Replenish(
            device_pb.ReplenishRequest(request_id="q", device_id=other.device.device_id, slot_id="black"),
            metadata=device.auth,
        ),
        device.devices.GetForecast(
            device_pb.GetForecastRequest(device_id=other.device.device_id, slot_id="black"),
            metadata=device.auth,
        ),
    ]:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED and error_reason(error) == "DEVICE_MISMATCH"


def _sent_ahead_then_lockstep(device_id: str, tag: str) -> list[device_pb.StreamTelemetryRequest]:
    """Messages whose answers depend on the ones before them: a repeat of an earlier
    message's reading, a repeat within one message, a refill, a rejection; the last names
    another device and ends the stream."""
    return [
        device_pb.StreamTelemetryRequest(device_id=device_id, readings=[_reading(f"{tag}1", 200.0, ago=50)]),
        device_pb.StreamTelemetryRequest(
            readings=[_reading(f"{tag}1", 200.0, ago=50), _reading(f"{tag}2", 190.0, ago=40)]
        ),
        device_pb.StreamTelemetryRequest(
            readings=[_reading(f"{tag}3", 30.0, ago=30), _reading(f"{tag}3", 30.0, ago=30)]
        ),
        device_pb.StreamTelemetryRequest(readings=[_reading(f"{tag}4", 240.0, ago=20)]),
        device_pb.StreamTelemetryRequest(
            device_id=device_id, readings=[_reading(f"{tag}5", 150.0, ago=10, slot_id="color")]
        ),
        device_pb.StreamTelemetryRequest(readings=[_reading(f"{tag}6", 230.0, ago=5)]),
        device_pb.StreamTelemetryRequest(device_id="someone-else", readings=[_reading(f"{tag}7", 220.0)]),
    ]


def _seen(answer: device_pb.StreamTelemetryResponse) -> tuple[object, ...]:
    return (
        [(r.status, r.field, r.reason, r.refill_detected) for r in answer.results],
        [(o.slot_id, o.outcome, o.level) for o in answer.slot_outcomes],
    )


async def test_a_stream_sent_ahead_is_answered_as_the_same_messages_one_at_a_time(
    start_service, database_url
):
    """Messages waiting when the server turns to a stream are stored together; each answer,
    and what is stored, is what the messages sent one at a time get."""
    ahead = await _device(start_service, database_url)
    stub = ahead.stub
    other = await stub.RegisterDevice(
        _registration(request_id="reg-lockstep", serial="SN-LOCKSTEP"),
        metadata=ahead.service.auth("service:storefront"),
    )
    lockstep_id, lockstep_auth = other.device.device_id, _device_auth(other.device_token)

    async def all_at_once() -> Any:
        for message in _sent_ahead_then_lockstep(ahead.device_id, "a"):
            yield message

    sent_ahead = []
    call = ahead.devices.StreamTelemetry(all_at_once(), metadata=ahead.auth)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for answer in call:
            sent_ahead.append(_seen(answer))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "device_id" in field_violations(caught.value)

    one_at_a_time = []
    call = ahead.devices.StreamTelemetry(metadata=lockstep_auth)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        for message in _sent_ahead_then_lockstep(lockstep_id, "a"):
            await call.write(message)
            one_at_a_time.append(_seen(await call.read()))  # the answer before the next message
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    assert len(sent_ahead) == 6 and sent_ahead == one_at_a_time
    assert [statuses for statuses, _ in sent_ahead[:3]] == [
        [(ACCEPTED, "", "", False)],
        [(DUPLICATE, "", "", False), (ACCEPTED, "", "", False)],
        [(ACCEPTED, "", "", False), (REJECTED, "reading_id", "DUPLICATE_IN_BATCH", False)],
    ]
    assert sent_ahead[3][0] == [(ACCEPTED, "", "", True)]  # the refill
    assert sent_ahead[4][0] == [(REJECTED, "level", "LEVEL_ABOVE_CAPACITY", False)]
    stored = _stored_readings(database_url, ahead.device_id)
    assert [r[1:] for r in stored] == [r[1:] for r in _stored_readings(database_url, lockstep_id)]
    assert [r[0] for r in stored] == ["a1", "a2", "a3", "a4", "a6"]
    assert (await ahead.slot()).state.level == 230.0


def _stream_readers() -> list[asyncio.Task[Any]]:
    """The running StreamTelemetry stream readers (shared/request_groups.py) of this process."""
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "arrived_together.<locals>.read"
    ]


async def test_a_stream_its_device_cancels_ends_and_leaves_no_reader(start_service):
    device = await _device(start_service)
    stats = metrics.RPC_METRICS.stats("replenishment", "StreamTelemetry")
    before = dict(stats.codes)
    call = device.devices.StreamTelemetry(metadata=device.auth)
    await call.write(
        device_pb.StreamTelemetryRequest(device_id=device.device_id, readings=[_reading("c1", 200.0)])
    )
    assert [r.status for r in (await call.read()).results] == [ACCEPTED]
    assert len(_stream_readers()) == 1  # waiting for the next message
    call.cancel()
    deadline = time.monotonic() + 10
    while sum(stats.codes.values()) == sum(before.values()) or _stream_readers():
        assert time.monotonic() < deadline, f"the stream did not end: {stats.codes}, {_stream_readers()}"
        await asyncio.sleep(0.01)
    # gRPC either cancels the handler or ends its request stream first (then it ends OK).
    ended = {code: n - before.get(code, 0) for code, n in stats.codes.items() if n != before.get(code, 0)}
    assert ended in ({"CANCELLED": 1}, {"OK": 1})
    # The answered reading is stored, and the device streams again.
    assert (await device.slot()).state.level == 200.0
    again = device.devices.StreamTelemetry(metadata=device.auth)
    await again.write(
        device_pb.StreamTelemetryRequest(device_id=device.device_id, readings=[_reading("c2", 190.0)])
    )
    assert [r.status for r in (await again.read()).results] == [ACCEPTED]
    await again.done_writing()
    assert await again.code() == grpc.StatusCode.OK


async def test_admin_reports_for_any_device_but_not_an_unknown_or_retired_one(start_service):
    device = await _device(start_service)
    admin = device.service.auth()
    answer = await device.report(_reading("adm", 120.0), metadata=admin)
    assert answer.results[0].status == ACCEPTED
    # A report by admin is not the device being seen.
    assert not (
        await device.stub.GetDevice(pb.GetDeviceRequest(device_id=device.device_id), metadata=admin)
    ).device.HasField("last_seen_time")
    await device.report(_reading("own", 110.0))
    seen = (
        await device.stub.GetDevice(pb.GetDeviceRequest(device_id=device.device_id), metadata=admin)
    ).device
    assert abs(seen.last_seen_time.seconds - time.time()) < 5
    error = await rpc_error(
        device.devices.ReportTelemetry(
            device_pb.ReportTelemetryRequest(device_id="dev_unknown", readings=[_reading("z", 1.0)]),
            metadata=admin,
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "DEVICE_NOT_FOUND"
    await device.stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=device.device_id), metadata=admin)
    error = await rpc_error(device.report(_reading("z", 1.0), metadata=admin))
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "DEVICE_DEREGISTERED"
    )


async def test_deregistration_and_rotation_take_effect_on_the_next_device_call(start_service, database_url):
    device = await _device(start_service, database_url)
    storefront = device.service.auth("service:storefront")
    assert (await device.report(_reading("t1", 200.0))).results[0].status == ACCEPTED

    # Rotation with a grace: both tokens work until it ends; a retry shows no token.
    request = pb.RotateDeviceTokenRequest(
        request_id="rot-1", device_id=device.device_id, previous_token_grace=duration_pb2.Duration(seconds=2)
    )
    rotated = await device.stub.RotateDeviceToken(request, metadata=storefront)
    assert rotated.device_token and rotated.device_token != device.token
    grace_end = rotated.previous_token_expire_time.ToNanoseconds() / 1e9
    assert 1.5 < grace_end - rotated.token_create_time.ToNanoseconds() / 1e9 <= 2.0
    retry = await device.stub.RotateDeviceToken(request, metadata=storefront)
    assert retry.device_token == "" and retry.token_create_time == rotated.token_create_time
    new_auth = _device_auth(rotated.device_token)
    assert (await device.report(_reading("t2", 199.0))).results[0].status == ACCEPTED
    assert (await device.report(_reading("t3", 198.0), metadata=new_auth)).results[0].status == ACCEPTED
    await asyncio.sleep(max(0.0, grace_end + 0.05 - time.time()))  # past the grace end, a clock time
    error = await rpc_error(device.report(_reading("t4", 197.0)))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED

    # Rotation without a grace revokes the previous token at once.
    again = await device.stub.RotateDeviceToken(
        pb.RotateDeviceTokenRequest(request_id="rot-2", device_id=device.device_id), metadata=storefront
    )
    assert again.previous_token_expire_time == again.token_create_time
    error = await rpc_error(device.report(_reading("t5", 196.0), metadata=new_auth))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    newest = _device_auth(again.device_token)
    assert (await device.report(_reading("t6", 195.0), metadata=newest)).results[0].status == ACCEPTED

    # Out-of-range grace is the field's fault.
    error = await rpc_error(
        device.stub.RotateDeviceToken(
            pb.RotateDeviceTokenRequest(
                request_id="rot-3",
                device_id=device.device_id,
                previous_token_grace=duration_pb2.Duration(seconds=DAY + 1),
            ),
            metadata=storefront,
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "previous_token_grace" in field_violations(
        error
    )

    # Deregistration: the very next call of the device is UNAUTHENTICATED.
    await device.stub.DeregisterDevice(
        pb.DeregisterDeviceRequest(device_id=device.device_id), metadata=storefront
    )
    error = await rpc_error(device.report(_reading("t7", 194.0), metadata=newest))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    error = await rpc_error(
        device.stub.RotateDeviceToken(
            pb.RotateDeviceTokenRequest(request_id="rot-4", device_id=device.device_id), metadata=storefront
        )
    )
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "DEVICE_DEREGISTERED"
    )
    events = await device.events(pb.SLOT_EVENT_TYPE_DEVICE_REGISTERED, pb.SLOT_EVENT_TYPE_DEVICE_DEREGISTERED)
    assert [(e.type, e.slot_id) for e in events] == [
        (pb.SLOT_EVENT_TYPE_DEVICE_REGISTERED, ""),
        (pb.SLOT_EVENT_TYPE_DEVICE_DEREGISTERED, ""),
    ]


async def test_the_device_sees_the_forecast_the_back_end_sees(start_service):
    device = await _device(start_service)
    day = 86_400
    await device.report(*(_reading(f"f{i}", 240.0 - 10 * i, ago=(6 - i) * day) for i in range(6)))
    mine = (
        await device.devices.GetForecast(
            device_pb.GetForecastRequest(device_id=device.device_id, slot_id="black"), metadata=device.auth
        )
    ).forecast
    theirs = (
        await device.stub.GetSlotForecast(
            pb.GetSlotForecastRequest(device_id=device.device_id, slot_id="black"),
            metadata=device.service.auth(),
        )
    ).forecast
    assert mine.status == device_pb.FORECAST_STATUS_OK and mine.unit == "ml"
    assert mine.consumption_rate_per_day == pytest.approx(theirs.consumption_rate_per_day, rel=0.05)
    assert mine.consumption_rate_per_day == pytest.approx(10.0, rel=0.2)
    assert mine.reorder_point == pytest.approx(theirs.reorder_point, rel=0.05) and mine.explanation
    assert mine.lead_time == theirs.lead_time
    error = await rpc_error(
        device.devices.GetForecast(
            device_pb.GetForecastRequest(device_id=device.device_id, slot_id="nope"), metadata=device.auth
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "SLOT_NOT_FOUND"
    error = await rpc_error(
        device.devices.GetForecast(
            device_pb.GetForecastRequest(device_id="dev_unknown", slot_id="black"),
            metadata=device.service.auth(),
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "DEVICE_NOT_FOUND"
