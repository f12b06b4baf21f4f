"""The epoch series kept in process (epoch_series.py): the forecast from a kept series is
exactly the forecast from a fresh read, whatever the readings do (in order, late, the same
time twice, refills, duplicates, more than forecast.MAX_READINGS), and whoever else writes
(another replica, a write rolled back, a restart). Real SQLite (and PostgreSQL with the
postgres marker's database_url), telemetry.record as the service calls it."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.replenishment import forecast, telemetry
from services.replenishment.app import MIGRATIONS
from services.replenishment.devices import Registration, settled_registration
from services.replenishment.epoch_series import EpochSeries
from services.replenishment.slot_forecasts import forecast_of_slot, load_slot
from services.replenishment.slots import DAY_US, SlotSettings
from services.replenishment.store import ReplenishmentStore
from shared.db import Database
from shared.validation import Violations

HOUR_US = DAY_US // 24
START_US = 1_800_000_000_000_000
NOW_US = START_US + 29 * DAY_US  # every reading within the 30 days telemetry accepts
CAPACITY = 100.0
SERIALS = itertools.count()


@pytest.fixture
def database(database_url):
    database = Database(database_url, "replenishment", MIGRATIONS)
    database.migrate()
    yield database
    database.close()


def _device(database: Database, serial: str) -> str:
    registration = settled_registration(
        Violations(),
        Registration(
            customer_id="cus_1",
            manufacturer="acme",
            model="p1",
            kind="printer",
            serial_number=serial,
            slots=(SlotSettings(slot_id="black", item_id="ink", capacity=CAPACITY, unit="ml"),),
        ),
    )
    store = ReplenishmentStore(database, None)  # type: ignore[arg-type]
    return database.transaction(
        lambda c: store.insert_device(c, f"dev_{serial}", registration, f"h{serial}").device_id
    )


class Writer:
    """One replica's view: its own kept series."""

    def __init__(self) -> None:
        self.kept = EpochSeries()

    def report(self, connection: Any, device_id: str, points: list[tuple[str, int, float]]) -> None:
        """Stores the readings and runs the forecast, as a report and its decision do."""
        batch = [telemetry.Reading(rid, "black", level, t) for rid, t, level in points]
        telemetry.record(connection, device_id, batch, NOW_US, True, self.kept)
        self.forecast(connection, device_id)

    def forecast(self, connection: Any, device_id: str) -> forecast.Forecast:
        return forecast_of_slot(
            connection, load_slot(connection, device_id, "black"), NOW_US, self.kept
        ).result


def _fresh(connection: Any, device_id: str) -> forecast.Forecast:
    return forecast_of_slot(connection, load_slot(connection, device_id, "black"), NOW_US).result


def _check(database: Database, writer: Writer, device_id: str) -> None:
    kept, fresh = database.transaction(lambda c: (writer.forecast(c, device_id), _fresh(c, device_id)))
    assert kept == fresh


# One step: (kind, hours after the latest reading (negative: late), level change, batch size)
STEPS = st.lists(
    st.tuples(
        st.sampled_from(["report"] * 6 + ["replica", "rollback", "restart", "duplicate"]),
        st.sampled_from([1, 1, 1, 2, 5, 0, -3]),
        st.sampled_from([-1.0, -0.5, -2.0, 0.0, 0.3, 30.0]),
        st.integers(1, 3),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=STEPS)
def test_the_kept_series_gives_the_fresh_forecast_whatever_happens(database, steps):
    device_id = _device(database, f"s{next(SERIALS)}")
    ours, other = Writer(), Writer()
    latest, level, sent = START_US, 80.0, []
    for n, (kind, hours, change, size) in enumerate(steps):
        if kind == "restart":
            ours = Writer()
            continue
        if kind == "duplicate" and sent:
            database.transaction(lambda c: ours.report(c, device_id, sent[-1:]))  # noqa: B023
            _check(database, ours, device_id)
            continue
        points = []
        for i in range(size):
            latest += hours * HOUR_US
            level = min(max(level + change, 0.0), CAPACITY)
            points.append((f"r{n}-{i}", latest, level))
        writer = other if kind == "replica" else ours
        if kind == "rollback":

            def rolled_back(connection: Any) -> None:
                savepoint = connection.begin_nested()
                ours.report(connection, device_id, points)  # noqa: B023 (the kept series moves on...)
                savepoint.rollback()  # ...and the write does not happen

            database.transaction(rolled_back)
        else:
            database.transaction(lambda c: writer.report(c, device_id, points))  # noqa: B023
            sent.extend(points)
        _check(database, ours, device_id)


def test_a_long_series_is_kept_past_the_forecasts_window_and_used(database):
    device_id = _device(database, "long")
    writer = Writer()
    for n in range(forecast.MAX_READINGS + 20):
        level = 90.0 - 0.1 * n + (0.3 if n % 7 == 0 else 0.0)
        database.transaction(
            lambda c: writer.report(c, device_id, [(f"r{n}", START_US + n * HOUR_US // 2, level)])  # noqa: B023
        )
        if n % 50 == 0 or n >= forecast.MAX_READINGS - 2:
            _check(database, writer, device_id)
    # Every decision but the first two (no revision yet, then the first read) used the series
    # the report before extended.
    assert writer.kept.misses <= 2
    assert writer.kept.hits >= forecast.MAX_READINGS + 18


def test_a_series_left_alone_is_dropped():
    kept = EpochSeries()
    times, levels = forecast.sorted_readings([(1, 5.0), (2, 4.0)])
    kept.keep_read("d", "s", 0, 7, 2, times, levels)
    assert kept.get("d", "s", 0, 7) is not None
    assert kept.get("d", "s", 0, 8) is None and kept.get("d", "s", 1, 7) is None  # another revision, epoch
    kept.sweep()
    assert kept.get("d", "s", 0, 7) is not None  # kept just now
    kept.KEEP_SECONDS = -1.0  # anything kept before now is too old
    kept.sweep()
    assert kept.get("d", "s", 0, 7) is None
