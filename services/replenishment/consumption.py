"""Synthetic consumption with a known truth: how a slot empties, seeded and replayable.

A `ConsumptionModel` is one slot of one simulated device. Its usage is drawn per hour
from a generator seeded by (seed, day), so the path is the same however the caller
steps through time (an hour at a time from the device simulator, a day at a time from a
test) and the future can be read without changing the model: `level_at` and
`runout_time_us` are the truth the forecast is measured against. Sensor noise and
glitches come from a separate generator, so reading a level never changes the path.

Times are microseconds since the Unix epoch, as everywhere in the service.

Profiles (`UsageProfile.kind`):
- STEADY: every day about `rate_per_day` (day-to-day spread `daily_spread`), spread over
  waking hours (a dispenser, a water filter);
- BURSTY: a Poisson number of sessions a day, each of gamma-distributed size, with the
  same mean (a coffee machine on a busy weekend);
- INTERMITTENT: used on about `uses_per_week` days a week, once, with a large size (a
  home printer used twice a week).
Any profile may have idle weeks (`idle_week_share`: holidays).

`make_series(kind, ...)` plays the scenarios the forecast tests and the bench use:
steady, bursty, intermittent, a refill mid-series, a device that stops reporting, and a
noisy sensor, each with its true levels and true run-out time.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from services.replenishment.slots import DAY_US, HOUR_US

HOURS_PER_DAY = 24
WAKING_HOURS = np.arange(7, 23)  # steady use happens between 07:00 and 23:00
RUNOUT_HORIZON_DAYS = 5 * 366  # beyond this, a slot is taken never to run out


class UsageKind(enum.Enum):
    STEADY = "steady"
    BURSTY = "bursty"
    INTERMITTENT = "intermittent"


@dataclass(frozen=True)
class UsageProfile:
    """How a slot is used; `rate_per_day` is the long-run mean in the slot's unit."""

    kind: UsageKind
    rate_per_day: float
    daily_spread: float = 0.15  # STEADY: relative standard deviation of a day's use
    sessions_per_day: float = 1.5  # BURSTY: mean sessions a day
    uses_per_week: float = 2.0  # INTERMITTENT: mean days of use a week
    idle_week_share: float = 0.0  # chance that a whole week has no use at all


@dataclass(frozen=True)
class Sensor:
    """How the device reads its level: Gaussian noise and rare glitches, in share of capacity."""

    noise_share: float = 0.005
    glitch_share: float = 0.0  # chance that a reading is a random value in [0, capacity]
    resolution: float = 0.0  # readings are rounded to this step (0: not rounded)


@dataclass(frozen=True)
class OfflineSpell:
    """The device sends nothing from start_us until end_us (None: never again)."""

    start_us: int
    end_us: int | None = None

    def covers(self, t_us: int) -> bool:
        return self.start_us <= t_us and (self.end_us is None or t_us < self.end_us)


class ConsumptionModel:
    """One slot being used: its true level over time, refills, and noisy readings.

    Hour k of the model (from `start_us`) uses `hourly_usage` at its end; the level
    never goes below 0 (use beyond empty is unmet).
    """

    def __init__(
        self,
        profile: UsageProfile,
        *,
        capacity: float,
        seed: int,
        start_us: int,
        level: float | None = None,
        sensor: Sensor | None = None,
        offline: Sequence[OfflineSpell] = (),
    ) -> None:
        if not (math.isfinite(capacity) and capacity > 0):
            raise ValueError("capacity must be a finite number greater than 0")
        self.profile = profile
        self.capacity = float(capacity)
        self.seed = int(seed)
        self.start_us = int(start_us)
        self.sensor = sensor or Sensor()
        self.offline = tuple(offline)
        self.level = self.capacity if level is None else min(max(float(level), 0.0), self.capacity)
        self.now_us = self.start_us
        self._next_hour = 0  # the first hour whose usage is not yet applied
        self._days: dict[int, np.ndarray] = {}
        self._runout: tuple[int | None] | None = None  # cached until the level changes otherwise
        self._noise = np.random.default_rng([self.seed, 0x5E115])

    # The usage path ---------------------------------------------------------------
    def hourly_usage(self, day: int) -> np.ndarray:
        """The 24 hourly usages of model day `day` (from `start_us`), the same on every call."""
        usage = self._days.get(day)
        if usage is None:
            usage = _draw_day(self.profile, self.seed, day)
            # Only the day in progress and the next are kept (a thousand simulated devices
            # should not hold their look-ahead); the rest are drawn again when needed.
            current = self._next_hour // HOURS_PER_DAY
            if current <= day <= current + 1:
                for old in [d for d in self._days if d < current]:
                    del self._days[old]
                self._days[day] = usage
        return usage

    def _usage_between_hours(self, first: int, stop: int) -> float:
        """Total usage of hours first .. stop-1."""
        total = 0.0
        hour = first
        while hour < stop:
            day, offset = divmod(hour, HOURS_PER_DAY)
            end = min(HOURS_PER_DAY, offset + (stop - hour))
            total += float(self.hourly_usage(day)[offset:end].sum())
            hour += end - offset
        return total

    def _hours_done_by(self, t_us: int) -> int:
        """How many hours have ended at t_us."""
        return max(0, (t_us - self.start_us) // HOUR_US)

    # Stepping -----------------------------------------------------------------------
    def advance_to(self, t_us: int) -> float:
        """Moves the model to t_us (never backwards) and returns the true level then."""
        if t_us < self.now_us:
            raise ValueError("a consumption model cannot go back in time")
        stop = self._hours_done_by(t_us)
        if stop > self._next_hour:
            self.level = max(0.0, self.level - self._usage_between_hours(self._next_hour, stop))
            self._next_hour = stop
        self.now_us = int(t_us)
        return self.level

    def advance(self, dt_us: int) -> float:
        """Moves the model dt_us ahead and returns the true level then."""
        return self.advance_to(self.now_us + int(dt_us))

    def refill(self, level: float | None = None) -> None:
        """A new cartridge (or a top-up) at now_us: the level becomes `level` (default: full)."""
        self.level = self.capacity if level is None else min(max(float(level), 0.0), self.capacity)
        self._runout = None

    # The truth ----------------------------------------------------------------------
    def level_at(self, t_us: int) -> float:
        """The true level at t_us >= now_us if nothing is refilled; the model does not move."""
        if t_us < self.now_us:
            raise ValueError("level_at looks forward only")
        stop = self._hours_done_by(t_us)
        return max(0.0, self.level - self._usage_between_hours(self._next_hour, stop))

    def runout_time_us(self) -> int | None:
        """When the level reaches 0 if nothing is refilled (now_us if already empty).

        None when it does not within RUNOUT_HORIZON_DAYS (no use at all).
        """
        if self.level <= 0:
            return self.now_us
        if self._runout is None:
            self._runout = (self._find_runout(),)
        return self._runout[0]

    def _find_runout(self) -> int | None:
        remaining = self.level
        hour = self._next_hour
        last_day = hour // HOURS_PER_DAY + RUNOUT_HORIZON_DAYS
        while hour // HOURS_PER_DAY <= last_day:
            day, offset = divmod(hour, HOURS_PER_DAY)
            used = np.cumsum(self.hourly_usage(day)[offset:])
            reached = int(np.searchsorted(used, remaining - 1e-12))
            if reached < used.size:
                return self.start_us + (hour + reached + 1) * HOUR_US
            remaining -= float(used[-1]) if used.size else 0.0
            hour += HOURS_PER_DAY - offset
        return None

    # What the device reports ---------------------------------------------------------
    def is_reporting(self, t_us: int | None = None) -> bool:
        """Whether the device sends readings at t_us (default now_us)."""
        t = self.now_us if t_us is None else t_us
        return not any(spell.covers(t) for spell in self.offline)

    def read(self) -> float:
        """A sensor reading of the current level: noisy, sometimes a glitch, in [0, capacity]."""
        sensor = self.sensor
        if sensor.glitch_share > 0 and self._noise.random() < sensor.glitch_share:
            value = float(self._noise.uniform(0.0, self.capacity))
        else:
            value = self.level + float(self._noise.normal(0.0, sensor.noise_share * self.capacity))
        if sensor.resolution > 0:
            value = round(value / sensor.resolution) * sensor.resolution
        return min(max(value, 0.0), self.capacity)


def _draw_day(profile: UsageProfile, seed: int, day: int) -> np.ndarray:
    """Day `day`'s 24 hourly usages, from a generator seeded by (seed, day) alone."""
    usage = np.zeros(HOURS_PER_DAY)
    week_rng = np.random.default_rng([seed, 0x1D1E, day // 7])
    if profile.idle_week_share > 0 and week_rng.random() < profile.idle_week_share:
        return usage
    rng = np.random.default_rng([seed, day])
    rate = profile.rate_per_day
    if profile.kind is UsageKind.STEADY:
        amount = max(0.0, rate * (1.0 + profile.daily_spread * rng.standard_normal()))
        usage[WAKING_HOURS] = amount / WAKING_HOURS.size
    elif profile.kind is UsageKind.BURSTY:
        sessions = rng.poisson(profile.sessions_per_day)
        size = rate / profile.sessions_per_day
        for hour, amount in zip(
            rng.integers(7, 23, sessions), rng.gamma(0.7, size / 0.7, sessions), strict=True
        ):
            usage[hour] += amount
    else:
        share = min(1.0, profile.uses_per_week / 7.0)
        if rng.random() < share:
            usage[rng.integers(8, 22)] = rng.gamma(4.0, rate / share / 4.0)
    return usage


# Scenarios -----------------------------------------------------------------------------


class Scenario(enum.Enum):
    STEADY = "steady"
    BURSTY = "bursty"
    INTERMITTENT = "intermittent"
    REFILL = "refill"  # steady, refilled (to full) half way through
    STOPPED = "stopped"  # steady, the device stops reporting two thirds of the way through
    NOISY = "noisy"  # steady with 2 % sensor noise and 3 % glitches


@dataclass(frozen=True)
class SyntheticSeries:
    """What a simulated device reported, beside the truth."""

    readings: tuple[tuple[int, float], ...]  # (measure_time_us, level) as reported
    true_levels: tuple[float, ...]  # the true level at each reading's time
    refill_times_us: tuple[int, ...]
    end_us: int  # the time the series was played to ("now")
    level_at_end: float  # the true level at end_us
    runout_time_us: int | None  # the true run-out of the slot as it is at end_us
    profile: UsageProfile
    capacity: float
    last_report_us: int | None = field(default=None)

    def true_days_to_empty(self) -> float | None:
        if self.runout_time_us is None:
            return None
        return (self.runout_time_us - self.end_us) / DAY_US


def play(
    model: ConsumptionModel,
    *,
    until_us: int,
    every_us: int,
    refills_at_us: Sequence[int] = (),
) -> SyntheticSeries:
    """Reads the model every `every_us` from its now_us until `until_us` (not included).

    Refills (to full) happen at the given times, just before the reading due then.
    """
    readings: list[tuple[int, float]] = []
    truth: list[float] = []
    refills = sorted(refills_at_us)
    done_refills: list[int] = []
    t = model.now_us
    while t < until_us:
        while refills and refills[0] <= t:
            model.advance_to(max(model.now_us, refills[0]))
            model.refill()
            done_refills.append(refills.pop(0))
        model.advance_to(t)
        if model.is_reporting(t):
            readings.append((t, model.read()))
            truth.append(model.level)
        t += every_us
    model.advance_to(until_us)
    return SyntheticSeries(
        readings=tuple(readings),
        true_levels=tuple(truth),
        refill_times_us=tuple(done_refills),
        end_us=until_us,
        level_at_end=model.level,
        runout_time_us=model.runout_time_us(),
        profile=model.profile,
        capacity=model.capacity,
        last_report_us=readings[-1][0] if readings else None,
    )


def scenario_model(
    scenario: Scenario,
    *,
    seed: int,
    start_us: int,
    days: float,
    capacity: float = 1000.0,
    rate_per_day: float = 20.0,
) -> tuple[ConsumptionModel, tuple[int, ...]]:
    """A model for a named scenario, and the refill times it plays (REFILL only)."""
    kinds = {
        Scenario.BURSTY: UsageKind.BURSTY,
        Scenario.INTERMITTENT: UsageKind.INTERMITTENT,
    }
    profile = UsageProfile(kinds.get(scenario, UsageKind.STEADY), rate_per_day)
    sensor = Sensor(noise_share=0.02, glitch_share=0.03) if scenario is Scenario.NOISY else Sensor()
    offline: tuple[OfflineSpell, ...] = ()
    if scenario is Scenario.STOPPED:
        offline = (OfflineSpell(start_us + int(days * 2 / 3 * DAY_US)),)
    refills: tuple[int, ...] = ()
    if scenario is Scenario.REFILL:
        refills = (start_us + int(days / 2 * DAY_US),)
    model = ConsumptionModel(
        profile, capacity=capacity, seed=seed, start_us=start_us, sensor=sensor, offline=offline
    )
    return model, refills


def make_series(
    scenario: Scenario,
    *,
    seed: int = 1,
    start_us: int = 1_767_225_600 * 1_000_000,  # 2026-01-01T00:00:00Z
    days: float = 30.0,
    every_us: int = DAY_US,
    capacity: float = 1000.0,
    rate_per_day: float = 20.0,
) -> SyntheticSeries:
    """Plays a named scenario for `days`, a reading every `every_us`, starting full."""
    model, refills = scenario_model(
        scenario, seed=seed, start_us=start_us, days=days, capacity=capacity, rate_per_day=rate_per_day
    )
    # Readings at a fixed clock time, offset from midnight like a real device's schedule.
    model.advance_to(start_us + 9 * HOUR_US + 1)
    return play(model, until_us=start_us + int(days * DAY_US), every_us=every_us, refills_at_us=refills)
