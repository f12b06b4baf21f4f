"""The readings of each slot's current epoch, kept in process between decisions.

The decision (ordering.py) runs a slot's forecast after every telemetry report. Reading
the epoch's readings back (up to forecast.MAX_READINGS) and sorting them cost, at a few
hundred readings, about as much as the forecast's arithmetic, for a series that only grew
by the reading just stored (bench/replenishment_writer_bench.py). So
each process keeps, per slot, the series the forecast takes (forecast.sorted_readings'
form: times strictly increasing, their levels) and appends a report's readings to it.

Exactness: a kept series is used only while it is provably the one a fresh read would give.
It is tagged with the slot's `readings_revision` (migration 0006), a random number written
with every write of the slot's readings (telemetry.record). A report appends to a kept
series only when the series carries the revision the report read under the slot's lock (or
SQLite's single writer), the epoch did not change, and every reading of the report is newer
than the series' latest; it then carries the report's new revision. Anything else forgets
the slot: a late reading, a refill (a new epoch), a delivery (its epoch's first point comes
from the slot, not the readings), a second reading at the same time. Another replica's
write, a write rolled back after the series was updated (a failed savepoint) and a restart
all show as a revision this process does not hold, and the next forecast reads the
readings again. A series read from the database is kept only when its times are already
distinct and finite (sorted_readings changed nothing but the order).

A series neither read from the database nor extended for KEEP_SECONDS is dropped (checked every SWEEP_EVERY
look-ups): the readings of a slot deleted or erased, here or on another replica, leave
memory within that.
Not kept: the device's token (deregistration holds at the next call on every replica).
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.replenishment.forecast import MAX_READINGS


@dataclass(frozen=True)
class Series:
    """A slot's epoch readings at one revision (read-only arrays)."""

    epoch: int
    revision: int
    times: np.ndarray  # int64 µs, strictly increasing
    levels: np.ndarray  # float64
    used: float = 0.0  # time.monotonic() when kept or last extended


def _frozen(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


class EpochSeries:
    """Per process: slot -> its current epoch's series (see the module docstring)."""

    MAX_SLOTS = 200_000  # slots kept; beyond it every series is forgotten (re-read on demand)
    KEEP_SECONDS = 600.0
    SWEEP_EVERY = 4096

    def __init__(self) -> None:
        self._kept: dict[tuple[str, str], Series] = {}
        self._lock = threading.Lock()  # the writer thread and readers' threads both use it
        self.hits = 0
        self.misses = 0
        self._until_sweep = self.SWEEP_EVERY

    def get(self, device_id: str, slot_id: str, epoch: int, revision: int | None) -> Series | None:
        """The kept series when it is the slot's at `revision` and `epoch`, else None."""
        self._until_sweep -= 1
        if self._until_sweep <= 0:
            self.sweep()
        found = self._kept.get((device_id, slot_id))
        if found is None or revision is None or found.revision != revision or found.epoch != epoch:
            self.misses += 1
            return None
        self.hits += 1
        return found

    def keep_read(
        self,
        device_id: str,
        slot_id: str,
        epoch: int,
        revision: int | None,
        rows: int,
        times: np.ndarray,
        levels: np.ndarray,
    ) -> None:
        """Keeps a series read from the database (`rows` rows, before sorted_readings) when
        sorting only reordered it: no two rows at one time, none dropped."""
        if revision is None or times.size != rows:
            return
        if times.size > 1 and not bool((times[1:] > times[:-1]).all()):
            return
        self._put(
            (device_id, slot_id), Series(epoch, revision, _frozen(times), _frozen(levels), time.monotonic())
        )

    def append(
        self,
        device_id: str,
        slot_id: str,
        *,
        before: int | None,
        after: int,
        epoch_before: int,
        epoch_after: int,
        added: Sequence[tuple[int, float]],
        in_order: bool,
    ) -> None:
        """A report stored `added` (in time order) for the slot, whose revision went from
        `before` to `after`: extends the series kept at `before`, or forgets the slot."""
        key = (device_id, slot_id)
        found = self._kept.get(key)
        times = [t for t, _ in added]
        levels = [level for _, level in added]
        if (
            found is None
            or before is None
            or found.revision != before
            or found.epoch != epoch_before
            or epoch_after != epoch_before
            or not in_order
            or not all(math.isfinite(level) for level in levels)
            or (found.times.size and times[0] <= int(found.times[-1]))
            or any(b <= a for a, b in itertools.pairwise(times))
        ):
            self.forget(device_id, slot_id)
            return
        # The same conversion as sorted_readings: through a float64.
        new_times = np.fromiter((float(t) for t in times), dtype=float, count=len(times)).astype(np.int64)
        grown_times = np.concatenate((found.times, new_times))[-MAX_READINGS:]
        grown_levels = np.concatenate((found.levels, np.asarray(levels, dtype=float)))[-MAX_READINGS:]
        self._put(
            key, Series(epoch_after, after, _frozen(grown_times), _frozen(grown_levels), time.monotonic())
        )

    def forget(self, device_id: str, slot_id: str) -> None:
        with self._lock:
            self._kept.pop((device_id, slot_id), None)

    def _put(self, key: tuple[str, str], series: Series) -> None:
        with self._lock:
            if len(self._kept) >= self.MAX_SLOTS and key not in self._kept:
                self._kept.clear()
            self._kept[key] = series

    def sweep(self) -> None:
        """Drops the series older than KEEP_SECONDS."""
        self._until_sweep = self.SWEEP_EVERY
        oldest = time.monotonic() - self.KEEP_SECONDS
        with self._lock:
            for key in [key for key, series in self._kept.items() if series.used < oldest]:
                del self._kept[key]
