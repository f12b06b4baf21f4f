"""A device simulator: registers devices and plays their consumption over gRPC.

`python -m services.replenishment.simulator` (see --help), and an async library for tests,
benches and `make run` (which plays a few demo devices with it):

- **Registration** (`register_devices`): RegisterDevice through the back-end API as a
  customer-facing principal (or admin), idempotent by a request id derived from the
  device; the token, shown once, is kept in a JSON file (`DeviceBook`, e.g.
  <data_dir>/demo-devices.json) so that a restart, or a grpcurl user, can act as the device.
  A device registered before whose token was lost gets a new one (RotateDeviceToken).
- **Consumption** comes from services/replenishment/consumption.py (seeded, with a known
  truth): steady use (a water filter), bursty sessions (a coffee machine), intermittent
  use (a printer used twice a week), offline spells, and refills when an order arrives.
- **Time** (`SimClock`): the server accepts readings at most 30 days old and 5 minutes
  ahead of its clock, so simulated time cannot run ahead of real time. It starts in the
  past (`history`) and runs `speed` times faster than real time until it reaches the real
  clock, then keeps to it: the recent past is replayed quickly (a simulated day every
  86400/speed real seconds), then the devices report live. The demo devices are started
  at levels that reach their reorder points late in that replay, so orders appear within
  the first minute of `make run`.
- **Reporting**: each device reads each of its slots every `reading_interval` of simulated
  time and sends the readings due in one ReportTelemetry call (or on one StreamTelemetry
  stream) with its own token, at most every `min_call_seconds` of real time (devices
  buffer readings). Reading ids are derived from the slot and the measure time, so a
  batch sent again after a lost answer is DUPLICATE, never stored twice. UNAVAILABLE and
  RESOURCE_EXHAUSTED (the per-device rate limit) keep the batch for the next call.
- **Fulfilment** (optional, `Fulfilment`): follows WatchOrderEvents as
  service:fulfilment, ships every PLACED order at once and delivers it after its lead
  time divided by `speed` (accelerated); the delivered slot is then refilled by its
  simulated customer (a new cartridge: the next reading is full, a refill for the server).

The simulator never reads the service's tables: everything goes through the two APIs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from services.replenishment.consumption import (
    ConsumptionModel,
    OfflineSpell,
    Sensor,
    UsageKind,
    UsageProfile,
)
from services.replenishment.slots import DAY_US, HOUR_US
from shared.errors import error_reason
from shared.log import configure_logging, get_logger

log = get_logger("replenishment.simulator")

SECOND_US = 1_000_000
MAX_READING_AGE_US = 30 * DAY_US  # the server rejects older readings (device.v1 Reading)
MAX_BATCH = 1000  # readings per ReportTelemetry call (device.v1)
CALL_TIMEOUT = 10.0
DEFAULT_SPEED = 86_400.0  # a simulated day per real second
DEFAULT_HISTORY_DAYS = 20.0
DEFAULT_READING_INTERVAL_US = 2 * HOUR_US
DEFAULT_MIN_CALL_SECONDS = 0.5
DEMO_DEVICES_FILE = "demo-devices.json"

# How each kind of device is used when the simulator knows no more: days one full slot lasts.
KIND_USAGE: dict[str, tuple[UsageKind, float]] = {
    "printer": (UsageKind.INTERMITTENT, 30.0),
    "water_filter": (UsageKind.STEADY, 30.0),
    "coffee_machine": (UsageKind.BURSTY, 40.0),
}
DEFAULT_USAGE = (UsageKind.STEADY, 30.0)


def _metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def request_id_for(*parts: str) -> str:
    """A request id (1 to 64 of [A-Za-z0-9._:-]) naming `parts`, hashed when too long."""
    text = "-".join(parts)
    if len(text) <= 64 and all(c.isalnum() or c in "._:-" for c in text):
        return text
    return f"{parts[0][:20]}-{hashlib.sha256(text.encode()).hexdigest()[:40]}"


# -- what to register ---------------------------------------------------------------------


@dataclass(frozen=True)
class SlotSpec:
    """One slot to register, and how it is used."""

    slot_id: str
    item_id: str
    capacity: float = 100.0
    unit: str = "percent"
    display_name: str = ""
    unit_price_micros: int = 1_000_000_000
    currency_code: str = "JPY"
    policy: int = pb.SLOT_POLICY_AUTO
    lead_time_us: int = 3 * DAY_US


@dataclass(frozen=True)
class DeviceSpec:
    """One device to register for a customer. `name` is its key in the DeviceBook."""

    name: str
    customer_id: str
    kind: str
    serial_number: str
    slots: tuple[SlotSpec, ...]
    manufacturer: str = "Najimi Sim"
    model: str = "SIM-1"
    display_name: str = ""
    test: bool = False

    def register_request(self) -> pb.RegisterDeviceRequest:
        return pb.RegisterDeviceRequest(
            request_id=request_id_for("sim-register", self.name, self.serial_number),
            customer_id=self.customer_id,
            manufacturer=self.manufacturer,
            model=self.model,
            kind=self.kind,
            serial_number=self.serial_number,
            display_name=self.display_name,
            test=self.test,
            slots=[
                pb.Slot(
                    slot_id=slot.slot_id,
                    display_name=slot.display_name,
                    item_id=slot.item_id,
                    capacity=slot.capacity,
                    unit=slot.unit,
                    reorder_quantity=1,
                    unit_price_micros=slot.unit_price_micros,
                    currency_code=slot.currency_code,
                    policy=slot.policy,  # type: ignore[arg-type]
                    lead_time=duration_pb2.Duration(seconds=slot.lead_time_us // SECOND_US),
                )
                for slot in self.slots
            ],
        )


@dataclass(frozen=True)
class DeviceCredentials:
    """A registered device and its token (a DeviceBook entry)."""

    name: str
    device_id: str
    customer_id: str
    kind: str
    token: str

    @property
    def principal(self) -> str:
        return f"device:{self.device_id}"


class DeviceBook:
    """The registered devices' tokens in a JSON file, private to the user (mode 0600):
    name -> {device_id, customer_id, kind, principal, token}. Written whole on each change."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, DeviceCredentials] = {}
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text())
            except ValueError:
                raw = {}
            for name, entry in raw.items() if isinstance(raw, dict) else ():
                if isinstance(entry, dict) and {"device_id", "token"} <= entry.keys():
                    self.entries[name] = DeviceCredentials(
                        name,
                        str(entry["device_id"]),
                        str(entry.get("customer_id", "")),
                        str(entry.get("kind", "")),
                        str(entry["token"]),
                    )

    def put(self, credentials: DeviceCredentials) -> None:
        self.entries[credentials.name] = credentials
        if self.path is None:
            return
        content = {
            name: {
                "device_id": c.device_id,
                "customer_id": c.customer_id,
                "kind": c.kind,
                "principal": c.principal,
                "token": c.token,
            }
            for name, c in self.entries.items()
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(content, file, indent=2)
            file.write("\n")


async def register_device(
    stub: pb_grpc.ReplenishmentServiceStub, token: str, spec: DeviceSpec, book: DeviceBook
) -> DeviceCredentials:
    """Registers one device (a retry is safe); its token goes into `book`."""
    reply = await stub.RegisterDevice(
        spec.register_request(), metadata=_metadata(token), timeout=CALL_TIMEOUT
    )
    device_id = reply.device.device_id
    known = book.entries.get(spec.name)
    device_token = reply.device_token
    if not device_token:  # registered before: the token was shown then
        if known is not None and known.device_id == device_id:
            return known
        device_token = await rotate_token(stub, token, device_id)
    credentials = DeviceCredentials(spec.name, device_id, spec.customer_id, spec.kind, device_token)
    book.put(credentials)
    return credentials


async def rotate_token(stub: pb_grpc.ReplenishmentServiceStub, token: str, device_id: str) -> str:
    """A new token for a registered device whose token was lost (the old one stops at once)."""
    rotated = await stub.RotateDeviceToken(
        pb.RotateDeviceTokenRequest(
            request_id=request_id_for("sim-rotate", device_id, str(time.time_ns())), device_id=device_id
        ),
        metadata=_metadata(token),
        timeout=CALL_TIMEOUT,
    )
    return str(rotated.device_token)


async def register_devices(
    channel: grpc.aio.Channel,
    token: str,
    specs: Sequence[DeviceSpec],
    book: DeviceBook,
    concurrency: int = 16,
) -> list[DeviceCredentials]:
    """Registers every spec (`concurrency` calls in flight), in the order given."""
    stub = pb_grpc.ReplenishmentServiceStub(channel)
    room = asyncio.Semaphore(concurrency)

    async def one(spec: DeviceSpec) -> DeviceCredentials:
        async with room:
            return await register_device(stub, token, spec, book)

    return list(await asyncio.gather(*(one(spec) for spec in specs)))


# -- time -----------------------------------------------------------------------------------


class SimClock:
    """Simulated time: from `start_us`, `speed` times as fast as the real clock until it
    reaches it, then with it. `real_us` is injectable (tests)."""

    def __init__(self, start_us: int, speed: float, real_us: Callable[[], int] | None = None):
        if not (speed >= 1.0 and math.isfinite(speed)):
            raise ValueError("speed must be a finite number of at least 1")
        self.real_us = real_us or (lambda: time.time_ns() // 1000)
        self.start_us = int(start_us)
        self.speed = float(speed)
        self.real_start_us = self.real_us()

    @classmethod
    def replaying(cls, history_us: int, speed: float, real_us: Callable[[], int] | None = None) -> SimClock:
        """A clock that replays the last `history_us` of real time, then runs live."""
        clock = cls(0, speed, real_us)
        clock.start_us = clock.real_start_us - int(history_us)
        return clock

    def now_us(self) -> int:
        real = self.real_us()
        return min(real, self.start_us + int((real - self.real_start_us) * self.speed))

    def caught_up(self) -> bool:
        return self.now_us() >= self.real_us()

    def real_seconds_for(self, sim_us: int) -> float:
        """Real seconds `sim_us` of simulated time takes now (less once caught up)."""
        return sim_us / SECOND_US / (1.0 if self.caught_up() else self.speed)


# -- one device ---------------------------------------------------------------------------------


@dataclass
class SlotPlay:
    """One simulated slot: its consumption and the reading times still to send."""

    slot_id: str
    capacity: float
    lead_time_us: int
    model: ConsumptionModel
    next_reading_us: int
    refill_pending: bool = False


@dataclass
class Stats:
    """What the simulation did (per reading status, per outcome, fulfilment steps, errors)."""

    readings: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    orders_seen: set[str] = field(default_factory=set)
    fulfilment: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    calls: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "readings": dict(self.readings),
            "outcomes": dict(self.outcomes),
            "orders": len(self.orders_seen),
            "fulfilment": dict(self.fulfilment),
            "errors": dict(self.errors),
        }


StartLevel = Callable[[DeviceCredentials, float], float]  # (device, slot capacity) -> level


def usage_of(kind: str, capacity: float) -> UsageProfile:
    """How a device of `kind` uses a slot of `capacity` (KIND_USAGE)."""
    usage_kind, days = KIND_USAGE.get(kind, DEFAULT_USAGE)
    return UsageProfile(usage_kind, capacity / days)


class SimulatedDevice:
    """One registered device playing its slots' consumption and reporting it."""

    def __init__(self, credentials: DeviceCredentials, slots: Sequence[SlotPlay], reading_interval_us: int):
        self.credentials = credentials
        self.slots = {slot.slot_id: slot for slot in slots}
        self.reading_interval_us = reading_interval_us
        self.pending: list[device_pb.Reading] = []
        self.outcomes: dict[str, int] = {}  # slot_id -> the latest ReplenishOutcome
        self.open_orders: dict[str, str] = {}  # slot_id -> the order the service reported
        self.stopped = False

    @property
    def device_id(self) -> str:
        return self.credentials.device_id

    def due_readings(self, now_us: int) -> list[device_pb.Reading]:
        """Plays every slot to `now_us` and returns the readings due by then (buffered)."""
        for slot in self.slots.values():
            while slot.next_reading_us <= now_us:
                at = slot.next_reading_us
                slot.model.advance_to(max(slot.model.now_us, at))
                if slot.refill_pending:  # the customer put the delivered consumable in
                    slot.model.refill()
                    slot.refill_pending = False
                if slot.model.is_reporting(at):
                    reading = device_pb.Reading(
                        reading_id=f"{slot.slot_id}-{at // SECOND_US}"[-64:],
                        slot_id=slot.slot_id,
                        level=round(slot.model.read(), 4),
                    )
                    reading.measure_time.FromMicroseconds(at)
                    self.pending.append(reading)
                slot.next_reading_us = at + self.reading_interval_us
        return self.pending[:MAX_BATCH]

    def answered(self, sent: int, reply: Any, stats: Stats) -> None:
        """Takes a ReportTelemetry (or stream) answer for the first `sent` pending readings."""
        del self.pending[:sent]
        stats.calls += 1
        for result in reply.results:
            stats.readings[device_pb.ReadingStatus.Name(result.status).removeprefix("READING_STATUS_")] += 1
            if result.status == device_pb.READING_STATUS_REJECTED:
                log.warning(
                    "reading_rejected",
                    device_id=self.device_id,
                    reading_id=result.reading_id,
                    field=result.field,
                    reason=result.reason,
                )
        for outcome in reply.slot_outcomes:
            name = device_pb.ReplenishOutcome.Name(outcome.outcome).removeprefix("REPLENISH_OUTCOME_")
            stats.outcomes[name] += 1
            if outcome.order_id:
                stats.orders_seen.add(outcome.order_id)
                self.open_orders[outcome.slot_id] = outcome.order_id
            if self.outcomes.get(outcome.slot_id) != outcome.outcome:
                log.info(
                    "slot_outcome",
                    device_id=self.device_id,
                    slot_id=outcome.slot_id,
                    outcome=name,
                    order_id=outcome.order_id,
                    level=outcome.level,
                )
            self.outcomes[outcome.slot_id] = outcome.outcome

    def refill(self, slot_id: str) -> None:
        """A delivery arrived: the slot is refilled before its next reading."""
        slot = self.slots.get(slot_id)
        if slot is not None:
            slot.refill_pending = True
            self.open_orders.pop(slot_id, None)


async def slot_plays(
    stub: pb_grpc.ReplenishmentServiceStub,
    token: str,
    credentials: DeviceCredentials,
    clock: SimClock,
    *,
    seed: int,
    start_level: StartLevel | None = None,
    offline: Sequence[OfflineSpell] = (),
    sensor: Sensor | None = None,
) -> list[SlotPlay]:
    """The device's slots as the service holds them (GetDevice with a back-end token), each
    with a consumption model: continued from the slot's latest reading when it is recent
    (a restarted simulator), else started at `start_level(device, capacity)` (default:
    full) at the clock's start."""
    reply = await stub.GetDevice(
        pb.GetDeviceRequest(device_id=credentials.device_id), metadata=_metadata(token), timeout=CALL_TIMEOUT
    )
    plays = []
    for index, slot in enumerate(reply.device.slots):
        start_us = clock.now_us()
        level = start_level(credentials, slot.capacity) if start_level else slot.capacity
        if slot.state.HasField("level_time"):
            last_us = slot.state.level_time.ToMicroseconds()
            if clock.real_us() - last_us < MAX_READING_AGE_US - DAY_US and last_us >= start_us:
                start_us, level = last_us, slot.state.level
        lead_time_us = slot.lead_time.ToMicroseconds() if slot.HasField("lead_time") else 3 * DAY_US
        model = ConsumptionModel(
            usage_of(credentials.kind, slot.capacity),
            capacity=slot.capacity,
            seed=seed * 1009 + index,
            start_us=start_us,
            level=level,
            sensor=sensor,
            offline=offline,
        )
        plays.append(SlotPlay(slot.slot_id, slot.capacity, lead_time_us, model, start_us + 1))
    return plays


# -- fulfilment ---------------------------------------------------------------------------------


class Fulfilment:
    """A small fulfilment centre: follows WatchOrderEvents (as service:fulfilment), ships
    each PLACED order at once and delivers it `lead time / speed` real seconds later, then
    tells `on_delivered(device_id, slot_id)`. Request ids derive from the order, so a
    restart repeats nothing; an order already past a step is left as it is."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        token: str,
        speed: float,
        stats: Stats,
        on_delivered: Callable[[str, str], None],
    ):
        self.stub = pb_grpc.ReplenishmentServiceStub(channel)
        self.metadata = _metadata(token)
        self.speed = speed
        self.stats = stats
        self.on_delivered = on_delivered
        self.revision = 0
        self.handled: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Watches until cancelled, again after the server ends a stream."""
        delay = 0.2
        while True:
            try:
                await self._watch()
                delay = 0.2
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self.stats.errors[f"watch:{code.name}"] += 1
                if code == grpc.StatusCode.OUT_OF_RANGE:  # compacted: from the oldest retained event
                    self.revision = 0
                elif code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    log.warning("fulfilment_stopped", code=code.name, details=error.details())
                    return
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)

    async def _watch(self) -> None:
        request = pb.WatchOrderEventsRequest(since_revision=self.revision)
        async for message in self.stub.WatchOrderEvents(request, metadata=self.metadata):
            if message.HasField("heartbeat"):
                self.revision = max(self.revision, message.heartbeat.current_revision)
                continue
            event = message.event
            self.revision = max(self.revision, event.revision)
            order = event.order
            if order.state == pb.ORDER_STATE_PLACED and order.order_id not in self.handled:
                self.handled.add(order.order_id)
                task = asyncio.create_task(self._fulfil(order))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)

    async def _fulfil(self, order: pb.Order) -> None:
        tracking = pb.ShipmentTracking(carrier="sim", tracking_number=request_id_for("SIM", order.order_id))
        try:
            await self.stub.ShipOrder(
                pb.ShipOrderRequest(
                    request_id=request_id_for("ship", order.order_id),
                    order_id=order.order_id,
                    tracking=tracking,
                ),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
            self.stats.fulfilment["shipped"] += 1
            lead_us = max(
                0, order.expected_delivery_time.ToMicroseconds() - order.create_time.ToMicroseconds()
            )
            await asyncio.sleep(lead_us / SECOND_US / self.speed)
            await self.stub.DeliverOrder(
                pb.DeliverOrderRequest(
                    request_id=request_id_for("deliver", order.order_id), order_id=order.order_id
                ),
                metadata=self.metadata,
                timeout=CALL_TIMEOUT,
            )
        except grpc.aio.AioRpcError as error:
            self.stats.errors[f"fulfil:{error.code().name}"] += 1
            if error.code() != grpc.StatusCode.FAILED_PRECONDITION:  # cancelled or done meanwhile
                log.warning("fulfilment_failed", order_id=order.order_id, code=error.code().name)
            self.handled.discard(order.order_id)  # the next replay of the feed tries again
            return
        self.stats.fulfilment["delivered"] += 1
        log.info("order_delivered", order_id=order.order_id, device_id=order.device_id, slot_id=order.slot_id)
        self.on_delivered(order.device_id, order.slot_id)

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# -- the simulation -------------------------------------------------------------------------------


@dataclass
class SimulationOptions:
    speed: float = DEFAULT_SPEED
    reading_interval_us: int = DEFAULT_READING_INTERVAL_US
    min_call_seconds: float = DEFAULT_MIN_CALL_SECONDS  # real seconds between a device's calls
    stream: bool = False  # StreamTelemetry (one stream per device) instead of ReportTelemetry


class Simulation:
    """Plays devices against a replenishment service until stopped (`run`)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        devices: Sequence[SimulatedDevice],
        clock: SimClock,
        options: SimulationOptions | None = None,
        fulfilment_token: str = "",
    ):
        self.channel = channel
        self.device_stub = device_grpc.DeviceServiceStub(channel)
        self.devices = {device.device_id: device for device in devices}
        self.clock = clock
        self.options = options or SimulationOptions(speed=clock.speed)
        self.stats = Stats()
        self.fulfilment = (
            Fulfilment(channel, fulfilment_token, self.clock.speed, self.stats, self._delivered)
            if fulfilment_token
            else None
        )

    def _delivered(self, device_id: str, slot_id: str) -> None:
        device = self.devices.get(device_id)
        if device is not None:
            device.refill(slot_id)

    async def run(self, stop: asyncio.Event) -> Stats:
        """Plays every device (and fulfilment) until `stop` is set; returns the stats."""
        tasks = [asyncio.create_task(self._play(device, stop)) for device in self.devices.values()]
        watcher = asyncio.create_task(self.fulfilment.run()) if self.fulfilment else None
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            if watcher is not None:
                watcher.cancel()
            await asyncio.gather(*tasks, *([watcher] if watcher else []), return_exceptions=True)
            if self.fulfilment is not None:
                await self.fulfilment.aclose()
        return self.stats

    async def _play(self, device: SimulatedDevice, stop: asyncio.Event) -> None:
        metadata = _metadata(device.credentials.token)
        stream = self.device_stub.StreamTelemetry(metadata=metadata) if self.options.stream else None
        first = True
        backoff = 0.0
        try:
            while not stop.is_set() and not device.stopped:
                batch = device.due_readings(self.clock.now_us())
                if batch:
                    backoff = await self._send(device, batch, metadata, stream, first)
                    first = False
                    if backoff and stream is not None:  # the server ended the stream: open another
                        stream = self.device_stub.StreamTelemetry(metadata=metadata)
                        first = True
                wait = max(
                    self.options.min_call_seconds,
                    backoff,
                    min(2.0, self.clock.real_seconds_for(self.options.reading_interval_us)),
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # not wait_for: it can swallow a cancel (3.11)
                        await stop.wait()
        finally:
            if stream is not None:
                stream.cancel()

    async def _send(
        self,
        device: SimulatedDevice,
        batch: list[device_pb.Reading],
        metadata: Any,
        stream: Any,
        first: bool,
    ) -> float:
        """Sends one batch; returns how long to back off (0 after an answer)."""
        try:
            if stream is not None:
                await stream.write(
                    device_pb.StreamTelemetryRequest(
                        device_id=device.device_id if first else "", readings=batch
                    )
                )
                reply = await stream.read()
                if reply is grpc.aio.EOF:
                    self.stats.errors["stream:EOF"] += 1
                    return 1.0
            else:
                reply = await self.device_stub.ReportTelemetry(
                    device_pb.ReportTelemetryRequest(device_id=device.device_id, readings=batch),
                    metadata=metadata,
                    timeout=CALL_TIMEOUT,
                )
        except grpc.aio.AioRpcError as error:
            code = error.code()
            self.stats.errors[code.name] += 1
            if code in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNIMPLEMENTED,
            ):
                log.warning(
                    "device_stopped", device_id=device.device_id, code=code.name, reason=error_reason(error)
                )
                device.stopped = True  # deregistered or erased (its token no longer works), or no telemetry
            elif code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                log.warning(
                    "telemetry_failed", device_id=device.device_id, code=code.name, details=error.details()
                )
                del device.pending[: len(batch)]  # not transient: sending it again would fail again
            return 1.0
        device.answered(len(batch), reply, self.stats)
        return 0.0


async def prepare_devices(
    channel: grpc.aio.Channel,
    token: str,
    credentials: Iterable[DeviceCredentials],
    clock: SimClock,
    options: SimulationOptions,
    *,
    seed: int = 1,
    start_level: StartLevel | None = None,
    offline: Callable[[DeviceCredentials], Sequence[OfflineSpell]] | None = None,
) -> list[SimulatedDevice]:
    """SimulatedDevices for registered devices, their slots read with a back-end `token`."""
    stub = pb_grpc.ReplenishmentServiceStub(channel)
    devices = []
    for index, device in enumerate(credentials):
        plays = await slot_plays(
            stub,
            token,
            device,
            clock,
            seed=seed * 7919 + index,
            start_level=start_level,
            offline=offline(device) if offline else (),
        )
        devices.append(SimulatedDevice(device, plays, options.reading_interval_us))
    return devices


# -- the demo fleet ----------------------------------------------------------------------------------


def demo_start_level(history_us: int) -> StartLevel:
    """Start levels for demo devices, so that each slot reaches its reorder point in the
    last days of the replay: enough for the history at the kind's rate, plus one to four
    days' worth (by device) left at the end."""

    def level(device: DeviceCredentials, capacity: float) -> float:
        usage = usage_of(device.kind, capacity)
        spare_days = 1.0 + int(hashlib.sha256(device.device_id.encode()).hexdigest(), 16) % 4
        return min(capacity, usage.rate_per_day * (history_us / DAY_US + spare_days))

    return level


def offline_spells(clock: SimClock, days: float) -> Callable[[DeviceCredentials], Sequence[OfflineSpell]]:
    """One offline spell of `days` per device (none for 0), starting at a time drawn from its
    id in the first half of the replay: the device sends nothing meanwhile (a power cut, a
    holiday with the router off) and catches up with fresh readings after it."""

    def spells(device: DeviceCredentials) -> Sequence[OfflineSpell]:
        if days <= 0:
            return ()
        history_us = max(0, clock.real_start_us - clock.start_us)
        draw = int(hashlib.sha256(f"offline:{device.device_id}".encode()).hexdigest(), 16) % 1000 / 1000
        start = clock.start_us + int(draw * history_us / 2)
        return (OfflineSpell(start, start + int(days * DAY_US)),)

    return spells


# -- the command ---------------------------------------------------------------------------------------


def _read_tokens(path: Path) -> dict[str, str]:
    tokens = json.loads(path.read_text())
    if not isinstance(tokens, dict):
        raise SystemExit(f"{path}: not a JSON object of principal -> token")
    return {str(k): str(v) for k, v in tokens.items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.replenishment.simulator",
        description=(
            "Plays simulated devices against the replenishment service: the devices of a device "
            "file (written by `make run`, or by --register), each reporting its slots' levels "
            "with its own token; optionally fulfils their orders. Stops on Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--address",
        default=os.environ.get("NAJIMI_REPLENISHMENT_ADDRESS", "127.0.0.1:50053"),
        help="the replenishment service (default: NAJIMI_REPLENISHMENT_ADDRESS or 127.0.0.1:50053)",
    )
    data_dir = Path(os.environ.get("NAJIMI_DATA_DIR", "data"))
    parser.add_argument(
        "--devices-file",
        type=Path,
        default=data_dir / DEMO_DEVICES_FILE,
        help="device name -> id and token (default: <data dir>/demo-devices.json)",
    )
    parser.add_argument(
        "--tokens-file",
        type=Path,
        default=data_dir / "dev-tokens.json",
        help="principal -> token, for the back-end calls (default: <data dir>/dev-tokens.json)",
    )
    parser.add_argument("--principal", default="service:storefront", help="registers and reads the devices")
    parser.add_argument(
        "--register",
        type=int,
        default=0,
        metavar="N",
        help="first register N simulated devices (customers sim-customer-0001 ...; a retry is safe)",
    )
    parser.add_argument("--customer-prefix", default="sim-customer-", help="with --register")
    parser.add_argument("--only", nargs="*", default=None, help="play only these device names")
    parser.add_argument("--skip", nargs="*", default=(), help="do not play these device names")
    parser.add_argument(
        "--day-seconds",
        type=float,
        default=86_400.0 / DEFAULT_SPEED,
        help="real seconds per simulated day while replaying the past (default: %(default)s)",
    )
    parser.add_argument(
        "--history-days",
        type=float,
        default=DEFAULT_HISTORY_DAYS,
        help="how far back the replay starts (at most 29; default: %(default)s)",
    )
    parser.add_argument(
        "--reading-hours", type=float, default=DEFAULT_READING_INTERVAL_US / HOUR_US, help="simulated hours"
    )
    parser.add_argument(
        "--offline-days",
        type=float,
        default=0.0,
        help="each device goes offline once for this many simulated days early in the replay (default: never)",
    )
    parser.add_argument("--stream", action="store_true", help="StreamTelemetry instead of ReportTelemetry")
    parser.add_argument(
        "--fulfil", action="store_true", help="ship and deliver the devices' orders as service:fulfilment"
    )
    parser.add_argument(
        "--demo", action="store_true", help="demo start levels: reorder points late in the replay"
    )
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until stopped)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not 0 < args.history_days <= 29:
        parser.error("--history-days must be above 0 and at most 29 (the server keeps 30 days)")
    if not 0 < args.day_seconds <= 86_400:
        parser.error("--day-seconds must be above 0 and at most 86400")
    return args


def simulated_specs(count: int, prefix: str) -> list[DeviceSpec]:
    """`count` devices of the three kinds, one customer each, for --register and benches."""
    kinds = (("water_filter", "filter"), ("printer", "ink"), ("coffee_machine", "descaler"))
    specs = []
    for n in range(count):
        kind, slot_id = kinds[n % len(kinds)]
        specs.append(
            DeviceSpec(
                name=f"sim-{n:05d}",
                customer_id=f"{prefix}{n:04d}",
                kind=kind,
                serial_number=f"SIM-{n:05d}",
                slots=(SlotSpec(slot_id, f"sim-{kind}-{slot_id}"),),
            )
        )
    return specs


async def run_command(args: argparse.Namespace, stop: asyncio.Event) -> Stats:
    tokens = _read_tokens(args.tokens_file)
    backend = tokens.get(args.principal) or sys.exit(f"{args.tokens_file} has no token for {args.principal}")
    book = DeviceBook(args.devices_file)
    history_us = int(args.history_days * DAY_US)
    speed = 86_400.0 / args.day_seconds
    clock = SimClock.replaying(history_us, speed)
    options = SimulationOptions(
        speed=speed, reading_interval_us=int(args.reading_hours * HOUR_US), stream=args.stream
    )
    async with grpc.aio.insecure_channel(args.address) as channel:
        if args.register:
            await register_devices(
                channel, backend, simulated_specs(args.register, args.customer_prefix), book
            )
        chosen = [
            c
            for name, c in book.entries.items()
            if (args.only is None or name in args.only) and name not in args.skip
        ]
        devices = await prepare_devices(
            channel,
            backend,
            chosen,
            clock,
            options,
            seed=args.seed,
            start_level=demo_start_level(history_us) if args.demo else None,
            offline=offline_spells(clock, args.offline_days),
        )
        log.info(
            "simulating",
            devices=len(devices),
            slots=sum(len(d.slots) for d in devices),
            speed=speed,
            history_days=args.history_days,
            fulfilment=args.fulfil,
        )
        simulation = Simulation(
            channel, devices, clock, options, tokens.get("service:fulfilment", "") if args.fulfil else ""
        )
        if args.seconds:
            asyncio.get_running_loop().call_later(args.seconds, stop.set)
        stats = await simulation.run(stop)
    log.info("simulation_stopped", **stats.summary())
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    from shared import stop_signals

    stop_signals.install()  # a stop signal (blocked until now by a launcher) ends the run cleanly
    args = parse_args(argv)
    configure_logging(os.environ.get("NAJIMI_LOG_FORMAT", "auto"), os.environ.get("NAJIMI_LOG_LEVEL", "info"))

    async def run() -> None:
        stop = asyncio.Event()
        with stop_signals.setting(asyncio.get_running_loop(), stop):
            await run_command(args, stop)

    try:
        asyncio.run(run())
    finally:
        stop_signals.ignore()


if __name__ == "__main__":
    main()
