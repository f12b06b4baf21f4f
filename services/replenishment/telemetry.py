"""Telemetry: the rules of a reading, and storing a batch of them in one transaction.

The rules (device.v1 ReportTelemetry documents them to devices):

- **Idempotent by reading_id** per device: the primary key (device_id, reading_id) of the
  readings table. A reading already stored is DUPLICATE; a second copy in one batch is
  REJECTED (DUPLICATE_IN_BATCH).
- **Skew bound**: measure_time at most MAX_FUTURE_US (5 minutes) ahead of the server's
  clock and at most MAX_AGE_US (30 days) old; the receive time is kept beside it.
- **Nonsense** is rejected per reading with the field: a malformed reading_id, an unknown
  slot, a non-finite or negative level, a level above capacity beyond CAPACITY_TOLERANCE.
- **Order by measure_time**: a slot's level is its reading with the latest measure_time;
  a late reading takes its place in the series without changing the level.
- **Refill** (`is_refill`): a rise, in measure_time order, of more than REFILL_SHARE of the
  capacity over the reading before it starts a new consumption epoch (REFILLED event). A
  late reading between two readings of one epoch cannot be a refill (the reading after it
  shows no refill: it is a spike); a late reading that rises between a refill and the
  reading before it is where the refill happened, and takes the refill over.
- **LOW and EMPTY** slot events on a change of the slot's status (slots.slot_status), not
  for every reading.

`record` stores a batch in the caller's transaction: one query for the device and its slots
(the slots locked on PostgreSQL, so concurrent batches of one device take turns), one for the
reading ids already stored (a batch of one reading asks in the first query), one multi-row
insert, one update per slot touched (with a new random readings_revision, which tells each
replica's kept epoch series, epoch_series.py, whether it is still the slot's), and one of
the device's last_seen_time when the device itself called.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from services.replenishment import slot_events
from services.replenishment.devices import DeviceState
from services.replenishment.epoch_series import EpochSeries
from services.replenishment.slots import DAY_US, SLOT_ID, Slot, SlotStatus, slot_status
from services.replenishment.store import _slot, device_deregistered, device_not_found, driver_sql, readings
from shared.validation import REQUEST_ID, is_valid_id

MAX_FUTURE_US = 5 * 60 * 1_000_000
MAX_AGE_US = 30 * DAY_US
CAPACITY_TOLERANCE = 0.01  # a level up to 1 % above capacity is sensor noise
REFILL_SHARE = 0.10  # of capacity: a rise above it is a refill
MAX_READINGS = 1000  # per request message
# slots.readings_revision: random, seeded from the OS (os.urandom) in each process; a
# collision of two revisions of one slot has a chance of 2**-63 per write.
_REVISIONS = random.Random()


def is_refill(previous_level: float, level: float, capacity: float) -> bool:
    """Whether `level`, measured after `previous_level`, is a refill (the proto's 10 % rule)."""
    return level - previous_level > REFILL_SHARE * capacity


@dataclass(frozen=True)
class Reading:
    """A reading as sent; measure_time_us None when unset or not a valid Timestamp."""

    reading_id: str
    slot_id: str
    level: float
    measure_time_us: int | None
    measure_time_set: bool = True


@dataclass
class Result:
    reading_id: str
    status: str = "ACCEPTED"  # ACCEPTED, DUPLICATE or REJECTED (ReadingStatus names)
    field: str = ""
    reason: str = ""
    description: str = ""
    refill: bool = False


@dataclass
class Batch:
    """What `record` did: one result per reading (request order), and the levels of the
    slots a stored or duplicate reading named."""

    results: list[Result]
    levels: dict[str, float | None] = field(default_factory=dict)


def rejection(reading: Reading, capacities: dict[str, float], now_us: int) -> tuple[str, str, str] | None:
    """(field, reason, description) of a reading that breaks a rule; None for a sound one."""
    if not is_valid_id(reading.reading_id, REQUEST_ID):
        return "reading_id", "INVALID_ID", f"must match {REQUEST_ID.pattern}"
    capacity = capacities.get(reading.slot_id)
    if capacity is None:
        if not is_valid_id(reading.slot_id, SLOT_ID):
            return "slot_id", "INVALID_ID", f"must match {SLOT_ID.pattern}"
        return "slot_id", "UNKNOWN_SLOT", "is not a slot of this device"
    level = reading.level
    if not math.isfinite(level):
        return "level", "LEVEL_NOT_FINITE", "must be a finite number"
    if level < 0:
        return "level", "LEVEL_NEGATIVE", "must not be negative"
    if level > capacity * (1 + CAPACITY_TOLERANCE):
        return "level", "LEVEL_ABOVE_CAPACITY", f"is above the slot's capacity of {capacity:g}"
    measured = reading.measure_time_us
    if measured is None:
        if reading.measure_time_set:
            return "measure_time", "MEASURE_TIME_MISSING", "is not a valid timestamp"
        return "measure_time", "MEASURE_TIME_MISSING", "is required"
    if measured > now_us + MAX_FUTURE_US:
        return "measure_time", "MEASURE_TIME_IN_FUTURE", "is more than 5 minutes ahead of the server's clock"
    if measured < now_us - MAX_AGE_US:
        return "measure_time", "MEASURE_TIME_TOO_OLD", "is more than 30 days old"
    return None


@dataclass
class _Series:
    """A slot's state while a batch is applied (slots.SlotState, mutable)."""

    slot: Slot
    level: float | None
    level_time_us: int | None
    epoch: int
    epoch_start_time_us: int | None
    last_refill_time_us: int | None
    last_batch: tuple[int, float, int] | None = None  # (time, level, epoch) of the batch's latest so far
    added: list[tuple[int, float]] = field(default_factory=list)  # the batch's (time, level), in order
    in_order: bool = True  # every reading of the batch came after the slot's latest


def _neighbour(
    connection: Connection, device_id: str, slot_id: str, measure_time_us: int, before: bool
) -> sa.Row | None:
    """The stored reading right before (or after) a measure time in the slot's series."""
    time_column = readings.c.measure_time_us
    query = sa.select(readings.c.reading_id, readings.c.level, time_column, readings.c.epoch).where(
        readings.c.device_id == device_id,
        readings.c.slot_id == slot_id,
        time_column <= measure_time_us if before else time_column > measure_time_us,
    )
    order = (
        (time_column.desc(), readings.c.reading_id.desc()) if before else (time_column, readings.c.reading_id)
    )
    return connection.execute(query.order_by(*order).limit(1)).first()


def _place_late(
    connection: Connection, device_id: str, series: _Series, reading: Reading, capacity: float
) -> tuple[int, bool]:
    """(epoch, refill) of a reading older than the slot's latest (see the module docstring)."""
    assert reading.measure_time_us is not None
    stored = _neighbour(connection, device_id, reading.slot_id, reading.measure_time_us, before=True)
    previous = series.last_batch
    if stored is not None and (previous is None or stored.measure_time_us > previous[0]):
        previous = (stored.measure_time_us, stored.level, stored.epoch)
    following = _neighbour(connection, device_id, reading.slot_id, reading.measure_time_us, before=False)
    if previous is None:
        return (following.epoch if following is not None else series.epoch), False
    if (
        following is not None
        and following.epoch != previous[2]
        and is_refill(previous[1], reading.level, capacity)
    ):
        # The refill happened before this reading: it moves here from the reading after.
        connection.execute(
            readings.update()
            .where(readings.c.device_id == device_id, readings.c.reading_id == following.reading_id)
            .values(refill=False)
        )
        if series.last_refill_time_us == following.measure_time_us:
            series.last_refill_time_us = reading.measure_time_us
        if series.epoch_start_time_us == following.measure_time_us:
            series.epoch_start_time_us = reading.measure_time_us
        return following.epoch, True
    return previous[2], False


def _slot_event(
    connection: Connection, device: Owner, series: _Series, event_type: str, now_us: int, message: str
) -> None:
    slot_events.append(
        connection,
        customer_id=device.customer_id,
        device_id=device.device_id,
        slot_id=series.slot.settings.slot_id,
        event_type=event_type,
        now_us=now_us,
        event_time_us=series.level_time_us,
        level=series.level,
        message=message,
        test=device.test,
    )


def _status_event(
    connection: Connection, device: Owner, series: _Series, before: SlotStatus, now_us: int
) -> None:
    settings = series.slot.settings
    after = slot_status(series.level, series.slot.reorder_level)
    name = settings.display_name or settings.slot_id
    if after is SlotStatus.EMPTY and before is not SlotStatus.EMPTY:
        _slot_event(connection, device, series, "EMPTY", now_us, f"{name} is empty")
    elif after is SlotStatus.LOW and before in (SlotStatus.OK, SlotStatus.NO_DATA):
        _slot_event(
            connection, device, series, "LOW", now_us, f"{name} is low: {series.level:g} {settings.unit} left"
        )


@dataclass(frozen=True)
class Owner:
    """What a slot event needs of the reporting device."""

    device_id: str
    customer_id: str
    test: bool


# The hot path's statements, as driver SQL (store.driver_sql).
_DEVICE = "SELECT customer_id, state, test FROM devices WHERE device_id = ?"
# The device and its slots in one query; a device without slots (or none at all) gives no
# row, and _owner tells which.
_DEVICE_SLOTS = (
    "SELECT s.*, d.customer_id AS device_customer_id, d.state AS device_state, d.test AS device_test{} "
    "FROM slots s JOIN devices d ON d.device_id = s.device_id WHERE s.device_id = ?"
)
# A batch of one reading (a device reporting each reading as it takes it) learns whether it
# is stored already in the same query: one statement less.
_ONE_STORED = ", EXISTS (SELECT 1 FROM readings r WHERE r.device_id = s.device_id AND r.reading_id = ?) AS reading_stored"
_STORED = "SELECT reading_id FROM readings WHERE device_id = ? AND reading_id IN ({})"
_INSERT = (
    "INSERT INTO readings (device_id, reading_id, slot_id, level, measure_time_us, receive_time_us, epoch, "
    "refill) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE_SLOT = (
    "UPDATE slots SET level = ?, level_time_us = ?, level_source = 'READING', epoch = ?, "
    "epoch_start_time_us = ?, last_refill_time_us = ?, readings_revision = ? WHERE device_id = ? AND slot_id = ?"
)
_SEEN = "UPDATE devices SET last_seen_time_us = ? WHERE device_id = ?"


def _owner(connection: Connection, device_id: str) -> Owner:
    row = driver_sql(connection, _DEVICE, (device_id,)).first()
    if row is None:
        raise device_not_found(device_id)
    if row.state != DeviceState.ACTIVE.value:
        raise device_deregistered(device_id)
    return Owner(device_id, row.customer_id, bool(row.test))


def record(
    connection: Connection,
    device_id: str,
    batch: Sequence[Reading],
    now_us: int,
    seen_by_device: bool,
    kept: EpochSeries | None = None,
) -> Batch:
    """Checks and stores a batch of an active device's readings in the caller's transaction
    (NOT_FOUND for an unknown device, FAILED_PRECONDITION for a retired one). Each slot
    written gets a new readings_revision; `kept` (the decisions' epoch series) follows."""
    one = batch[0].reading_id if len(batch) == 1 else None
    query = _DEVICE_SLOTS.format(_ONE_STORED if one is not None else "")
    locked = query + (" FOR UPDATE OF s" if connection.dialect.name == "postgresql" else "")
    found = driver_sql(connection, locked, (one, device_id) if one is not None else (device_id,)).all()
    if found:
        first = found[0]
        if first.device_state != DeviceState.ACTIVE.value:
            raise device_deregistered(device_id)
        device = Owner(device_id, first.device_customer_id, bool(first.device_test))
    else:
        device = _owner(connection, device_id)
    by_slot = {row.slot_id: _slot(row) for row in found}
    revisions = {row.slot_id: row.readings_revision for row in found}
    capacities = {slot_id: slot.settings.capacity for slot_id, slot in by_slot.items()}
    results = [Result(reading.reading_id) for reading in batch]
    sound: dict[str, int] = {}  # reading_id -> index in batch, first copy only
    for index, reading in enumerate(batch):
        problem = rejection(reading, capacities, now_us)
        if problem is None and reading.reading_id in sound:
            problem = ("reading_id", "DUPLICATE_IN_BATCH", "repeats an earlier reading_id of this batch")
        if problem is not None:
            result = results[index]
            result.status = "REJECTED"
            result.field, result.reason, result.description = problem
        else:
            sound[reading.reading_id] = index
    touched: set[str] = set()
    if sound:
        if one is not None:
            stored_ids: Iterable[tuple[str]] = [(one,)] if found[0].reading_stored else []
        else:
            ids = list(sound)
            stored_ids = driver_sql(connection, _STORED.format(", ".join("?" * len(ids))), (device_id, *ids))
        for (reading_id,) in stored_ids:
            index = sound.pop(reading_id)
            results[index].status = "DUPLICATE"
            touched.add(batch[index].slot_id)
    fresh = sorted(
        (batch[index] for index in sound.values()),
        key=lambda r: (r.slot_id, r.measure_time_us, r.reading_id),
    )
    rows: list[tuple[object, ...]] = []
    series_of: dict[str, _Series] = {}
    for reading in fresh:
        assert reading.measure_time_us is not None
        slot_id = reading.slot_id
        series = series_of.get(slot_id)
        if series is None:
            slot = by_slot[slot_id]
            state = slot.state
            series = series_of[slot_id] = _Series(
                slot,
                state.level,
                state.level_time_us,
                state.epoch,
                state.epoch_start_time_us,
                state.last_refill_time_us,
            )
        capacity = series.slot.settings.capacity
        measured = reading.measure_time_us
        if series.level_time_us is None or measured >= series.level_time_us:
            refill = series.level is not None and is_refill(series.level, reading.level, capacity)
            if series.level is None:
                series.epoch_start_time_us = measured
            if refill:
                series.epoch += 1
                series.epoch_start_time_us = series.last_refill_time_us = measured
            series.level, series.level_time_us = reading.level, measured
            epoch = series.epoch
            if refill:
                name = series.slot.settings.display_name or slot_id
                _slot_event(connection, device, series, "REFILLED", now_us, f"{name} was refilled")
        else:
            series.in_order = False
            epoch, refill = _place_late(connection, device_id, series, reading, capacity)
            start = series.epoch_start_time_us
            if epoch == series.epoch and (start is None or measured < start):
                series.epoch_start_time_us = measured  # the epoch's first reading came late
        series.last_batch = (measured, reading.level, epoch)
        series.added.append((measured, reading.level))
        rows.append((device_id, reading.reading_id, slot_id, reading.level, measured, now_us, epoch, refill))
        results[sound[reading.reading_id]].refill = refill
    if rows:
        driver_sql(connection, _INSERT, rows)
    for slot_id, series in series_of.items():
        state = series.slot.state
        revision = _REVISIONS.getrandbits(63)  # epoch_series.py: new at every write of the readings
        _status_event(
            connection,
            device,
            series,
            slot_status(state.level, series.slot.reorder_level),
            now_us,
        )
        driver_sql(
            connection,
            _UPDATE_SLOT,
            (
                series.level,
                series.level_time_us,
                series.epoch,
                series.epoch_start_time_us,
                series.last_refill_time_us,
                revision,
                device_id,
                slot_id,
            ),
        )
        if kept is not None:
            kept.append(
                device_id,
                slot_id,
                before=revisions[slot_id],
                after=revision,
                epoch_before=state.epoch,
                epoch_after=series.epoch,
                added=series.added,
                in_order=series.in_order,
            )
        touched.add(slot_id)
    if seen_by_device:
        driver_sql(connection, _SEEN, (now_us, device_id))
    levels = {}
    for slot_id in sorted(touched):
        series = series_of.get(slot_id)
        levels[slot_id] = series.level if series is not None else by_slot[slot_id].state.level
    return Batch(results, levels)


class RateLimiter:
    """A token bucket of readings per device: `rate` a second, at most `burst` saved up.

    Per process: with several replicas a device's limit is per replica it reaches."""

    MAX_DEVICES = 100_000  # buckets kept; the fullest (idle longest) go first beyond it

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}  # device -> (tokens, at monotonic time)

    def take(self, device_id: str, readings_count: int, refuse: bool = True) -> float:
        """Takes `readings_count` tokens; 0.0 when allowed, else the seconds until they would
        be (nothing taken). With refuse=False it always takes (the bucket may go below zero)."""
        now = time.monotonic()
        tokens, then = self._buckets.get(device_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if refuse and tokens < readings_count:
            self._buckets[device_id] = (tokens, now)
            return (readings_count - tokens) / self.rate
        if len(self._buckets) >= self.MAX_DEVICES and device_id not in self._buckets:
            self._buckets.clear()  # a flood of devices: forgetting buckets only lends tokens
        self._buckets[device_id] = (tokens - readings_count, now)
        return 0.0
