"""A stored slot's forecast: its readings of the current consumption epoch through forecast.py.

`forecast_of` reads the slot and the readings of its current epoch (the latest refill or
delivery starts the next; at most forecast.MAX_READINGS, newest first) and runs the pure
forecast. While the level comes from a delivery (no reading since), the delivered level
at the delivery time is the epoch's first point. The decision (ordering.py),
GetSlotForecast and the device's GetForecast all use it, so they agree. The decision passes
its process's EpochSeries (epoch_series.py): the epoch's readings kept from the last
decision and extended by telemetry.record, exactly what the read would give, or read again.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment import forecast, orders
from services.replenishment.epoch_series import EpochSeries
from services.replenishment.slots import safety_z
from services.replenishment.store import slots
from shared.errors import NotFound
from shared.proto_time import duration_of_micros, timestamp_of

STATUSES = {
    forecast.ForecastStatus.READY: pb.FORECAST_STATUS_OK,
    forecast.ForecastStatus.NO_CONSUMPTION: pb.FORECAST_STATUS_OK,
    forecast.ForecastStatus.INSUFFICIENT_DATA: pb.FORECAST_STATUS_INSUFFICIENT_DATA,
    forecast.ForecastStatus.STALE: pb.FORECAST_STATUS_STALE,
}
METHODS = {
    forecast.ForecastMethod.NONE: pb.FORECAST_METHOD_UNSPECIFIED,
    forecast.ForecastMethod.MEAN: pb.FORECAST_METHOD_ROBUST_TREND,
    forecast.ForecastMethod.TSB: pb.FORECAST_METHOD_INTERMITTENT_TSB,
}


@dataclass(frozen=True)
class SlotForecast:
    """The forecast of a stored slot, with what the messages need beside it."""

    device_id: str
    slot_id: str
    unit: str
    service_level: float
    lead_time_us: int
    has_data: bool  # any reading (or delivery) in the current epoch
    result: forecast.Forecast


def load_slot(connection: Connection, device_id: str, slot_id: str) -> sa.Row:
    row = connection.execute(
        sa.select(slots).where(slots.c.device_id == device_id, slots.c.slot_id == slot_id)
    ).first()
    if row is None:
        raise NotFound(f"device {device_id} has no slot {slot_id}", reason="SLOT_NOT_FOUND")
    return row


_EPOCH_READINGS = (
    "SELECT measure_time_us, level FROM readings WHERE device_id = ? AND slot_id = ? AND epoch = ? "
    "ORDER BY measure_time_us DESC LIMIT ?"
)


def _epoch_readings(connection: Connection, slot: sa.Row) -> list[tuple[int, float]]:
    # A raw DBAPI cursor in the caller's transaction: up to MAX_READINGS rows, where
    # SQLAlchemy's row objects cost several ms.
    cursor = connection.connection.cursor()
    try:
        cursor.execute(
            _EPOCH_READINGS.replace("?", "%s")
            if connection.dialect.name == "postgresql"
            else _EPOCH_READINGS,
            (slot.device_id, slot.slot_id, slot.epoch, forecast.MAX_READINGS),
        )
        return list(cursor.fetchall())
    finally:
        cursor.close()


def forecast_of_slot(
    connection: Connection, slot: sa.Row, now_us: int, kept: EpochSeries | None = None
) -> SlotForecast:
    """The slot's forecast now; with `kept`, from the epoch's series kept in process when it
    is the slot's current one (epoch_series.py), else read, and kept for the next time."""
    delivered = slot.level_source == "DELIVERY" and slot.level is not None and slot.level_time_us is not None
    series = (
        None
        if kept is None or delivered
        else kept.get(slot.device_id, slot.slot_id, slot.epoch, slot.readings_revision)
    )
    if series is not None:
        times, levels = series.times, series.levels
        has_data = bool(times.size)  # kept only when no row was dropped
    else:
        points = _epoch_readings(connection, slot)
        rows = len(points)
        if delivered:
            points.append((int(slot.level_time_us), float(slot.level)))
        has_data = bool(points)
        times, levels = forecast.sorted_readings(points)
        if kept is not None and not delivered:
            kept.keep_read(
                slot.device_id, slot.slot_id, slot.epoch, slot.readings_revision, rows, times, levels
            )
    result = forecast.forecast_of_series(
        times,
        levels,
        capacity=slot.capacity,
        lead_time_us=slot.lead_time_us,
        now_us=now_us,
        z=safety_z(slot.service_level),
        fallback_reorder_level=slot.fallback_reorder_level,
    )
    return SlotForecast(
        slot.device_id,
        slot.slot_id,
        slot.unit,
        slot.service_level,
        slot.lead_time_us,
        has_data,
        result,
    )


def forecast_of(connection: Connection, device_id: str, slot_id: str, now_us: int) -> SlotForecast:
    """The forecast of one slot now; NOT_FOUND (SLOT_NOT_FOUND) when the slot does not exist."""
    return forecast_of_slot(connection, load_slot(connection, device_id, slot_id), now_us)


def slot_forecast_message(
    found: SlotForecast, open_order_id: str = "", open_order_delivery_us: int | None = None
) -> pb.SlotForecast:
    """The proto SlotForecast; the open order's expected delivery is the expected replenishment."""
    result = found.result
    message = pb.SlotForecast(
        device_id=found.device_id,
        slot_id=found.slot_id,
        status=STATUSES[result.status],
        method=METHODS[result.method],
        explanation=result.explanation[:200],
        unit=found.unit,
        current_level=result.level,
        level_time=timestamp_of(result.level_time_us),
        empty_time=timestamp_of(result.empty_time_us),
        reorder_point=result.reorder_point,
        safety_stock=result.safety_stock,
        service_level=found.service_level,
        lead_time=duration_of_micros(found.lead_time_us),
        reorder_time=timestamp_of(result.reorder_time_us),
        expected_replenishment_time=timestamp_of(
            open_order_delivery_us if open_order_id else result.expected_replenishment_time_us
        ),
        confidence=result.confidence,
        readings_used=result.readings_used,
        window_start_time=timestamp_of(result.window_start_us),
        open_order_id=open_order_id,
        compute_time=timestamp_of(result.compute_time_us),
    )
    if result.rate_per_day is not None:
        message.consumption_rate_per_day = result.rate_per_day
    if result.sigma_per_day is not None:
        message.consumption_stddev_per_day = result.sigma_per_day
    if result.days_to_empty is not None:
        message.days_to_empty = result.days_to_empty
    return message


def current_forecast(connection: Connection, device_id: str, slot_id: str, now_us: int) -> pb.SlotForecast:
    """GetSlotForecast's answer (and GetForecast's, in the device's terms): the slot's forecast
    now, its open order's expected delivery as the expected replenishment."""
    found = forecast_of(connection, device_id, slot_id, now_us)
    current = orders.open_order(connection, device_id, slot_id)
    if current is None:
        return slot_forecast_message(found)
    delivery = current.estimated_delivery_time_us or current.expected_delivery_time_us
    return slot_forecast_message(found, current.order_id, delivery)
