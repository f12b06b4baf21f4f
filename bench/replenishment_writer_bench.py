"""The database writer's share of a one-reading telemetry report, in process: CPU time of
`telemetry.record` plus the decision's forecast (`forecast_of_slot`) for one reading, with
the epoch's series kept in process (services/replenishment/epoch_series.py) beside the
same work reading the series back from the database each time (the reference), at slots
holding 20, 200 and 450 readings of the current epoch (each round two fresh slots, filled
untimed, then REPORTS timed reports each). SQLite in a temporary directory, every report in
one open transaction (the commit, shared by up to 128 reports in the service, is left
out). Alternating rounds; the median and range of each, and their ratio.

Run: `.venv/bin/python bench/replenishment_writer_bench.py` (PYTHONPATH as for the tests).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import Spread

from services.replenishment import telemetry
from services.replenishment.app import MIGRATIONS
from services.replenishment.devices import Registration, settled_registration
from services.replenishment.epoch_series import EpochSeries
from services.replenishment.slot_forecasts import forecast_of_slot, load_slot
from services.replenishment.slots import DAY_US, SlotSettings
from services.replenishment.store import ReplenishmentStore
from shared.db import Database
from shared.validation import Violations

START_US = 1_800_000_000_000_000
NOW_US = START_US + 29 * DAY_US
HISTORIES = (20, 200, 450)
REPORTS = 50  # a round: this many one-reading reports, each followed by the forecast


class Slot:
    """One device with one slot, fed a reading a minute (a steady level)."""

    def __init__(self, database: Database, name: str, kept: EpochSeries | None):
        registration = settled_registration(
            Violations(),
            Registration(
                customer_id="cus_bench",
                manufacturer="bench",
                model="p1",
                kind="printer",
                serial_number=name,
                slots=(SlotSettings(slot_id="black", item_id="ink", capacity=100.0, unit="ml"),),
            ),
        )
        store = ReplenishmentStore(database, None)  # type: ignore[arg-type]
        self.device_id = database.transaction(
            lambda c: store.insert_device(c, f"dev_{name}", registration, f"hash_{name}").device_id
        )
        self.database, self.kept, self.sent = database, kept, 0

    def report(self, connection: Any) -> None:
        reading = telemetry.Reading(f"r{self.sent}", "black", 50.0, START_US + self.sent * 60_000_000)
        self.sent += 1
        telemetry.record(connection, self.device_id, [reading], NOW_US, True, self.kept)
        forecast_of_slot(connection, load_slot(connection, self.device_id, "black"), NOW_US, self.kept)

    def round_us(self) -> float:
        """CPU µs per report over REPORTS reports."""

        def reports(connection: Any) -> float:
            started = time.process_time()
            for _ in range(REPORTS):
                self.report(connection)
            return (time.process_time() - started) / REPORTS * 1e6

        return self.database.transaction(reports)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="najimi-writer-bench-") as tmp:
        database = Database(f"sqlite:///{Path(tmp) / 'replenishment.db'}", "replenishment", MIGRATIONS)
        database.migrate()
        print(f"{__doc__.split(chr(10) + chr(10))[0]}\n")
        for history in HISTORIES:
            figures: dict[str, list[float]] = {"kept": [], "read": []}
            for n in range(args.rounds):
                for name, kept in (("kept", EpochSeries()), ("read", None)):
                    slot = Slot(database, f"{name}{history}-{n}", kept)
                    database.transaction(lambda c, s=slot: [s.report(c) for _ in range(history)])  # noqa: B023
                    figures[name].append(slot.round_us())
            ratios = [k / r for k, r in zip(figures["kept"], figures["read"], strict=True)]
            print(
                f"slot with about {history} readings: kept series {Spread.of(figures['kept']).text('.0f', ' µs')}, "
                f"read back {Spread.of(figures['read']).text('.0f', ' µs')} per report; "
                f"kept / read {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
            )


if __name__ == "__main__":
    main()
