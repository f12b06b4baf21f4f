"""When a slot runs empty and when to reorder it, from its level readings. Pure and open.

The steps, for one slot (`forecast`):

1. **Window.** Readings sorted by measure_time (late and out-of-order readings take their
   place), the same time twice counted once, only the last WINDOW_DAYS days and at most
   MAX_READINGS readings: the cost is bounded on the telemetry hot path.
2. **Refills** (`split_epochs`). A rise of more than REFILL_TOLERANCE_SHARE of capacity
   (5 %) above the median of the epoch's previous five readings is a refill and starts a
   new consumption epoch, when the next reading confirms it; a rise the next reading does
   not confirm is a one-reading spike and is dropped. The tolerance assumes sensor noise up
   to about 1 % of capacity (5 sigma); a top-up smaller than 5 % is taken for noise.
3. **Outliers and noise.** Within an epoch a reading further than 4 robust standard
   deviations (and 2 % of capacity) from the median of its five neighbours is dropped
   (a Hampel filter), then the epoch is fitted with a non-increasing isotonic regression:
   within an epoch the level can only fall.
4. **Daily demand.** The epochs are put end to end (the unobserved time between the last
   reading before a refill and the first after it is left out, and so is the time a slot
   sits empty, when no use can show) and the fitted consumption
   is cut into whole days counted back from the latest reading: one demand per observed
   day, zeros for idle days included.
5. **Method.** Syntetos-Boylan-Croston classification: a series with an average demand
   interval (ADI, days per day with use) above 1.32 is intermittent.
   - Smooth (ADI <= 1.32): the rate is the mean daily demand of the monotone fit (total
     fitted consumption over observed days). Noise and outliers were dealt with in step
     3; a median of per-interval rates would be biased low for skewed (bursty) use, and a
     Theil-Sen slope costs O(n^2) or, with pairs half a window apart, is a median of
     half-window means with the same bias. sigma is the standard deviation of daily demand.
   - Intermittent: TSB (Teunter, Syntetos & Babai 2011, "Intermittent demand: linking
     forecasting to inventory obsolescence", EJOR 214): the probability of use on a day and
     the size of a use are smoothed separately, the probability every day, so the rate
     decays when a device stops being used, where Croston (1972), even with the
     Syntetos-Boylan (2005) bias correction, keeps its last estimate until the next use and
     would keep ordering toner for a printer nobody uses any more. sigma comes from the
     same model: daily demand is Bernoulli(p) times a size of mean z and variance s^2,
     variance p(s^2 + z^2) - p^2 z^2. `croston_sba` is here too, for comparison in tests.
   statsforecast implements both, but pulls numba, pandas and statsmodels (hundreds of MB
   and a JIT compilation at first call) for twenty lines of arithmetic on the hot path.
6. **Decision.** The current level is the fitted (isotonic) level at the latest reading,
   extrapolated to now at the rate; the Hampel filter never drops the latest epoch's last
   two readings, since a sudden drop there may be a burst of use that only later readings
   can tell from a glitch (a low glitch there makes an early order at worst). Safety stock =
   z * sigma * sqrt(cover); reorder point = rate * cover + safety stock (at most the
   capacity), where cover = lead time + review period, in days. The review period is the
   device's usual (median) interval between readings, at most 7 days: the decision is
   taken again only at the next reading, so the stock must last that long too (the
   periodic-review (R, s) policy; in the bench, stock-outs fell from 0.47 to 0.37 per
   device-year with it, early deliveries rose from 0.6 to 1.2). A caller that
   re-evaluates continuously passes review_us=0, which gives the plain
   rate * lead time + z * sigma * sqrt(lead time). Order now when the level is at or below
   the reorder point. The reorder time is when the level reaches the reorder point, the
   expected replenishment a lead time later.
7. **Status and confidence.** INSUFFICIENT_DATA under MIN_READINGS readings or less than
   one observed day (the slot's fallback reorder level applies); NO_CONSUMPTION when no day
   shows use; STALE when the latest reading is older than `stale_after_us` (the dates are
   still computed, extrapolated). Confidence = amount (observed days / 14, at most 1) x
   precision (1 / (1 + 2 x relative standard error of the rate); 1 with no consumption) x
   freshness (decays with the age of the latest reading beyond a day, e-fold every 3
   days); 0 with INSUFFICIENT_DATA.

On the cost: about 0.26 ms for 200 readings on a quiet core, 0.3-0.7 ms with other work
on both cores (bench/replenishment_forecast_bench.py measures it, at 200 and at 500
readings), so it can run for every reading received.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from services.replenishment.slots import DAY_US, DEFAULT_FALLBACK_SHARE, DEFAULT_SERVICE_LEVEL, safety_z

WINDOW_DAYS = 90
MAX_READINGS = 500
REFILL_TOLERANCE_SHARE = 0.05
OUTLIER_FLOOR_SHARE = 0.02
EMPTY_SHARE = 0.01  # a fitted level at or below 1 % of capacity is empty
MIN_READINGS = 3
REFERENCE_READINGS = (
    5  # a rise is measured from the median of this many previous readings (window_medians: 5)
)
STALE_AFTER_US = 3 * DAY_US
INTERMITTENT_ADI = 1.32
TSB_ALPHA = 0.1  # smoothing of the size of a use
TSB_BETA = 0.05  # smoothing of the probability of use on a day
DEFAULT_Z = safety_z(DEFAULT_SERVICE_LEVEL)  # 1.645, a 95 % service level
FULL_CONFIDENCE_DAYS = 14.0
MAX_REVIEW_DAYS = 7.0


class ForecastStatus(enum.Enum):
    READY = "READY"
    INSUFFICIENT_DATA = "INSUFFICIENT_DATA"
    NO_CONSUMPTION = "NO_CONSUMPTION"
    STALE = "STALE"


class ForecastMethod(enum.Enum):
    NONE = "none"  # too few readings
    MEAN = "mean"  # smooth demand: the mean daily demand of the monotone fit
    TSB = "tsb"  # intermittent demand


@dataclass(frozen=True)
class Forecast:
    """A slot's forecast at `compute_time_us`. Levels in the slot's unit, rates per day.

    With INSUFFICIENT_DATA the rate fields, days_to_empty and the times derived from them
    are None and reorder_point is the fallback level; with NO_CONSUMPTION the rate is 0
    and the empty and reorder times are None. STALE is READY (or NO_CONSUMPTION, when the
    rate is 0) from a device silent for longer than the bound: every field is computed,
    the level extrapolated, and the confidence low.
    """

    status: ForecastStatus
    method: ForecastMethod
    compute_time_us: int
    level: float  # estimated at compute_time_us
    level_time_us: int | None  # the latest reading used
    rate_per_day: float | None
    sigma_per_day: float | None
    days_to_empty: float | None  # from compute_time_us
    empty_time_us: int | None
    lead_time_days: float
    review_days: float  # the time until the next decision, covered beside the lead time
    safety_stock: float
    reorder_point: float
    order_now: bool
    reorder_time_us: int | None
    expected_replenishment_time_us: int | None
    confidence: float
    readings_used: int
    window_start_us: int | None
    epoch_start_us: int | None  # the latest refill (or first reading) used
    observed_days: int
    adi: float | None  # average demand interval in days
    explanation: str


def _median(values: np.ndarray) -> float:
    """np.median of a 1-d array without its overhead (this runs for every reading)."""
    n = values.size
    half = n // 2
    if n % 2:
        return float(np.partition(values, half)[half])
    part = np.partition(values, (half - 1, half))
    return float(part[half - 1] + part[half]) / 2.0


def window_medians(values: np.ndarray) -> np.ndarray:
    """The median of each run of 5 consecutive values (len(values) - 4 of them): the same
    numbers as np.partition over sliding_window_view(values, 5), from a min/max network on
    whole arrays, several times faster than a partition of each row (this runs for every
    reading received)."""
    m = values.size
    a, b, c, d, e = (values[i : m - 4 + i] for i in range(5))
    low = np.maximum(np.minimum(a, b), np.minimum(c, d))
    high = np.minimum(np.maximum(a, b), np.maximum(c, d))
    return np.maximum(np.minimum(e, low), np.minimum(np.maximum(e, low), high))


# Refills -------------------------------------------------------------------------------


def is_refill(recent_levels: Sequence[float], level: float, capacity: float) -> bool:
    """Whether a new reading `level` rises enough above the epoch's recent levels to be a refill.

    `recent_levels` are the epoch's latest readings in measure_time order (the last
    REFERENCE_READINGS count). This is the test `split_epochs` applies, without the
    confirmation by the next reading, which a reading just received cannot have yet: a
    one-reading spike is taken for a refill until the next reading says otherwise.
    """
    if not recent_levels:
        return False
    base = _median(np.asarray(recent_levels[-REFERENCE_READINGS:], dtype=float))
    return level - base > REFILL_TOLERANCE_SHARE * capacity


def split_epochs(
    levels: np.ndarray, capacity: float, tolerance_share: float = REFILL_TOLERANCE_SHARE
) -> tuple[list[int], list[int]]:
    """(epoch starts, spikes) of levels in measure_time order: indices into `levels`.

    starts[0] is 0; each later start is a confirmed refill (see the module docstring);
    spikes are one-reading rises that the next reading did not confirm.
    """
    n = levels.size
    if n < 2:
        return [0] * min(n, 1), []
    tolerance = tolerance_share * capacity
    padded = np.concatenate((np.repeat(levels[:1], REFERENCE_READINGS - 1), levels))
    reference = window_medians(padded)[: n - 1]
    candidates = np.flatnonzero(levels[1:] - reference > tolerance) + 1
    starts = [0]
    spikes: list[int] = []
    for i in candidates.tolist():
        previous = [j for j in range(max(starts[-1], i - REFERENCE_READINGS), i) if j not in spikes]
        if not previous:
            continue
        base = _median(levels[previous])
        if levels[i] - base <= tolerance:
            continue
        if i + 1 < n and levels[i + 1] - base <= tolerance:
            spikes.append(i)
        else:
            starts.append(i)
    return starts, spikes


def detect_refills(
    readings: Iterable[tuple[int, float]], capacity: float, tolerance_share: float = REFILL_TOLERANCE_SHARE
) -> list[int]:
    """The measure times of the readings that are refills (start a new epoch), any order in."""
    times, levels = sorted_readings(readings)
    starts, _ = split_epochs(levels, capacity, tolerance_share)
    return [int(times[i]) for i in starts[1:]]


# Intermittent demand ----------------------------------------------------------------------


def tsb(demand: np.ndarray, alpha: float = TSB_ALPHA, beta: float = TSB_BETA) -> tuple[float, float, float]:
    """TSB (Teunter, Syntetos & Babai 2011) over per-period demand: (rate, p, size).

    p (probability of demand in a period) is updated every period, p += beta (1[d>0] - p);
    the size z only in periods with demand, z += alpha (d - z). Forecast = p z. Both start
    from the series' own averages, as the paper's experiments initialise them.
    """
    used = demand > 0
    if not used.any():
        return 0.0, 0.0, 0.0
    p = float(used.mean())
    size = float(demand[used].mean())
    for d, u in zip(demand.tolist(), used.tolist(), strict=True):
        if u:
            p += beta * (1.0 - p)
            size += alpha * (d - size)
        else:
            p -= beta * p
    return p * size, p, size


def croston_sba(demand: np.ndarray, alpha: float = TSB_ALPHA) -> float:
    """Croston (1972) with the Syntetos-Boylan (2005) correction: (1 - alpha/2) z / q.

    z (size) and q (interval between demands) are smoothed only when demand occurs.
    """
    occurs = np.flatnonzero(demand > 0)
    if occurs.size == 0:
        return 0.0
    intervals = np.diff(np.concatenate(([-1], occurs)))
    size, interval = float(demand[occurs[0]]), float(intervals.mean())
    for d, q in zip(demand[occurs[1:]].tolist(), intervals[1:].tolist(), strict=True):
        size += alpha * (d - size)
        interval += alpha * (q - interval)
    return (1.0 - alpha / 2.0) * size / interval


# The forecast ------------------------------------------------------------------------------


def sorted_readings(readings: Iterable[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(times, levels) of readings in any order: finite ones only, sorted by time, the same
    time twice counted once (the later one received). Times are int64 µs taken through a
    float64 (exact below 2**53 µs, the year 2255), levels float64."""
    listed = readings if isinstance(readings, list | tuple) else list(readings)
    if not listed:
        return np.empty(0, dtype=np.int64), np.empty(0)
    # np.fromiter over the flattened pairs: half the time of np.array on a list of tuples.
    flat = itertools.chain.from_iterable(listed)
    pairs = np.fromiter(flat, dtype=float, count=2 * len(listed)).reshape(-1, 2)
    pairs = pairs[np.isfinite(pairs).all(axis=1)]  # telemetry rejects these; never trust it here
    times, levels = pairs[:, 0].astype(np.int64), pairs[:, 1]
    order = np.argsort(times, kind="stable")
    times, levels = times[order], levels[order]
    # The same measure_time twice: the later one received wins, as a replacement would.
    last = np.ones(times.size, dtype=bool)
    last[:-1] = times[1:] != times[:-1]
    return times[last], levels[last]


def _hampel_keep(levels: np.ndarray, floor: float, keep_last: int) -> np.ndarray:
    """Which readings of one epoch are within 4 robust sigma of their 5-neighbour median.

    The ends are padded by point reflection, which keeps a trend: a falling series is
    never an outlier of itself.

    The last `keep_last` are kept whatever they are: at the end of the latest epoch a
    sudden drop may be a burst of use, and only the next readings can tell.
    """
    keep = np.ones(levels.size, dtype=bool)
    if levels.size < 5:
        return keep
    neighbours = window_medians(
        np.concatenate((2 * levels[0] - levels[2:0:-1], levels, 2 * levels[-1] - levels[-2:-4:-1]))
    )
    residual = np.abs(levels - neighbours)
    scale = 1.4826 * _median(residual)
    keep[: levels.size - keep_last] = residual[: levels.size - keep_last] <= max(4.0 * scale, floor)
    return keep


@dataclass(frozen=True)
class _Consumption:
    daily: np.ndarray  # demand per observed day, oldest first
    noise: float  # robust standard deviation of readings around the fit
    level: float  # the fitted level at the latest kept reading
    level_time: float  # that reading's time (days, relative)
    epoch_start: float
    used: int


def _consumption(t: np.ndarray, levels: np.ndarray, capacity: float) -> _Consumption:
    starts, spikes = split_epochs(levels, capacity)
    keep = np.ones(levels.size, dtype=bool)
    keep[spikes] = False
    bounds = [*starts, levels.size]
    clock: list[np.ndarray] = []
    consumed: list[np.ndarray] = []
    residuals: list[np.ndarray] = []
    offset_days, offset_used = 0.0, 0.0
    level, level_time = float(levels[-1]), float(t[-1])
    for first, stop in itertools.pairwise(bounds):
        et, el = t[first:stop][keep[first:stop]], levels[first:stop][keep[first:stop]]
        inliers = _hampel_keep(el, OUTLIER_FLOOR_SHARE * capacity, 2 if stop == levels.size else 0)
        keep[first:stop][keep[first:stop]] = inliers
        et, el = et[inliers], el[inliers]
        if et.size:
            level, level_time = float(el[-1]), float(et[-1])
        if et.size < 2:
            continue
        fitted = isotonic_regression(el, increasing=False).x
        level = float(fitted[-1])
        residuals.append(el - fitted)
        # An empty slot shows no use whatever the demand: its time is not observed.
        empty = np.flatnonzero(fitted <= EMPTY_SHARE * capacity)
        if empty.size:
            et, fitted = et[: empty[0] + 1], fitted[: empty[0] + 1]
            if et.size < 2:
                continue
        clock.append(offset_days + (et - et[0]))
        consumed.append(offset_used + (fitted[0] - fitted))
        offset_days += float(et[-1] - et[0])
        offset_used += float(fitted[0] - fitted[-1])
    used = int(keep.sum())
    if not clock:
        return _Consumption(np.empty(0), 0.0, level, level_time, float(t[starts[-1]]), used)
    x, y = np.concatenate(clock), np.concatenate(consumed)
    days = math.floor(x[-1] + 1e-9)
    edges = x[-1] - np.arange(days, -1, -1, dtype=float)
    daily = np.diff(np.interp(edges, x, y))
    noise = 1.4826 * _median(np.abs(np.concatenate(residuals)))
    return _Consumption(daily, noise, level, level_time, float(t[starts[-1]]), used)


def _rate_and_sigma(
    daily: np.ndarray, capacity: float, noise: float
) -> tuple[ForecastMethod, float, float, float]:
    """(method, rate, sigma, adi) of a daily demand series of at least one day."""
    zero = max(1e-6 * capacity, noise)
    used = daily > zero
    n_used = int(used.sum())
    adi = daily.size / n_used if n_used else math.inf
    if n_used == 0:
        return ForecastMethod.MEAN, 0.0, 0.0, adi
    if adi > INTERMITTENT_ADI:
        rate, p, size = tsb(np.where(used, daily, 0.0))
        sizes = daily[used]
        size_var = float(sizes.var(ddof=1)) if sizes.size > 1 else 0.0
        variance = p * (size_var + size * size) - rate * rate
        return ForecastMethod.TSB, rate, math.sqrt(max(variance, 0.0)), adi
    rate = float(daily.mean())
    sigma = float(daily.std(ddof=1)) if daily.size > 1 else 0.0
    return ForecastMethod.MEAN, max(rate, 0.0), sigma, adi


def _review_days(times: np.ndarray) -> float:
    """The median interval between readings, in days, at most MAX_REVIEW_DAYS."""
    if times.size < 2:
        return 0.0
    return min(_median(np.diff(times).astype(float)) / DAY_US, MAX_REVIEW_DAYS)


def _fmt_days(days: float) -> str:
    if days < 1:
        return "less than a day"
    return f"about {days:.0f} day{'s' if round(days) != 1 else ''}"


def _check_capacity(capacity: float) -> None:
    if not (math.isfinite(capacity) and capacity > 0):
        raise ValueError("capacity must be a finite number greater than 0")


def forecast(
    readings: Iterable[tuple[int, float]],
    *,
    capacity: float,
    lead_time_us: int,
    now_us: int,
    z: float = DEFAULT_Z,
    fallback_reorder_level: float | None = None,
    stale_after_us: int = STALE_AFTER_US,
    review_us: int | None = None,
) -> Forecast:
    """The forecast of one slot from its readings (measure_time_us, level), in any order.

    `capacity` > 0 in the slot's unit; `lead_time_us` from ordering to delivery; `z` the
    standard normal quantile of the service level (slots.safety_z); the fallback reorder
    level (default 20 % of capacity) applies while the data are insufficient.
    `review_us` is how long until the decision is taken again: by default the device's
    usual interval between readings (pass 0 when the caller re-evaluates continuously).
    """
    times, levels = sorted_readings(readings)
    return forecast_of_series(  # checks the capacity
        times,
        levels,
        capacity=capacity,
        lead_time_us=lead_time_us,
        now_us=now_us,
        z=z,
        fallback_reorder_level=fallback_reorder_level,
        stale_after_us=stale_after_us,
        review_us=review_us,
    )


def forecast_of_series(
    times: np.ndarray,
    levels: np.ndarray,
    *,
    capacity: float,
    lead_time_us: int,
    now_us: int,
    z: float = DEFAULT_Z,
    fallback_reorder_level: float | None = None,
    stale_after_us: int = STALE_AFTER_US,
    review_us: int | None = None,
) -> Forecast:
    """`forecast` of readings already in `sorted_readings`' form: times strictly increasing
    (int64 µs), their levels (float64) beside them. Neither array is changed."""
    _check_capacity(capacity)
    lead_days = max(lead_time_us, 0) / DAY_US
    fallback = DEFAULT_FALLBACK_SHARE * capacity if fallback_reorder_level is None else fallback_reorder_level
    if times.size:
        recent = times >= times[-1] - WINDOW_DAYS * DAY_US
        times, levels = times[recent][-MAX_READINGS:], levels[recent][-MAX_READINGS:]
    if times.size == 0:
        return _insufficient(now_us, None, 0.0, 0, None, lead_days, fallback, "no readings yet")
    levels = np.clip(levels, 0.0, capacity)
    t = (times - times[-1]) / DAY_US  # days, 0 at the latest reading
    cons = _consumption(t, levels, capacity)
    latest_us = int(times[-1])
    if cons.used < MIN_READINGS or cons.daily.size < 1:
        level = cons.level
        reason = f"too few readings to estimate consumption ({cons.used} over {cons.daily.size} days)"
        return _insufficient(now_us, latest_us, level, cons.used, int(times[0]), lead_days, fallback, reason)
    method, rate, sigma, adi = _rate_and_sigma(cons.daily, capacity, cons.noise)
    age_days = (now_us - latest_us) / DAY_US
    level = min(max(cons.level - rate * max(age_days - cons.level_time, 0.0), 0.0), capacity)
    review_days = _review_days(times) if review_us is None else max(review_us, 0) / DAY_US
    cover_days = lead_days + review_days
    safety = min(z * sigma * math.sqrt(cover_days), capacity)
    observed = int(cons.daily.size)
    stale = now_us - latest_us > stale_after_us
    prefix = f"no reading for {age_days:.0f} days; " if stale else ""
    common = {
        "method": method,
        "compute_time_us": now_us,
        "level": level,
        "level_time_us": latest_us,
        "sigma_per_day": sigma,
        "lead_time_days": lead_days,
        "review_days": review_days,
        "readings_used": cons.used,
        "window_start_us": int(times[0]),
        "epoch_start_us": latest_us + round(cons.epoch_start * DAY_US),
        "observed_days": observed,
        "adi": adi,
    }
    amount = min(1.0, observed / FULL_CONFIDENCE_DAYS)
    freshness = math.exp(-max(age_days - 1.0, 0.0) / 3.0)
    if rate <= 0:
        return Forecast(
            status=ForecastStatus.STALE if stale else ForecastStatus.NO_CONSUMPTION,
            rate_per_day=0.0,
            days_to_empty=None,
            empty_time_us=None,
            safety_stock=0.0,
            reorder_point=0.0,
            order_now=level <= 0,
            reorder_time_us=None,
            expected_replenishment_time_us=None,
            confidence=round(amount * freshness, 3),
            explanation=f"{prefix}no consumption seen over {observed} days; nothing to order",
            **common,  # type: ignore[arg-type]
        )
    reorder_point = min(rate * cover_days + safety, capacity)
    days_to_empty = level / rate
    order_now = level <= reorder_point
    reorder_days = 0.0 if order_now else (level - reorder_point) / rate
    reorder_time = now_us + int(reorder_days * DAY_US)
    relative_se = sigma / math.sqrt(observed) / rate
    confidence = amount / (1.0 + 2.0 * relative_se) * freshness
    decision = (
        f"ordering now (at {reorder_point / rate:.0f} days left)"
        if order_now
        else f"ordering when {reorder_point / rate:.0f} days remain"
    )
    return Forecast(
        status=ForecastStatus.STALE if stale else ForecastStatus.READY,
        rate_per_day=rate,
        days_to_empty=days_to_empty,
        empty_time_us=now_us + int(days_to_empty * DAY_US),
        safety_stock=safety,
        reorder_point=reorder_point,
        order_now=order_now,
        reorder_time_us=reorder_time,
        expected_replenishment_time_us=reorder_time + int(lead_days * DAY_US),
        confidence=round(min(max(confidence, 0.0), 1.0), 3),
        explanation=f"{prefix}{_fmt_days(days_to_empty)} left; shipping takes {lead_days:.3g}; {decision}",
        **common,  # type: ignore[arg-type]
    )


def _insufficient(
    now_us: int,
    latest_us: int | None,
    level: float,
    used: int,
    window_start_us: int | None,
    lead_days: float,
    fallback: float,
    reason: str,
) -> Forecast:
    return Forecast(
        status=ForecastStatus.INSUFFICIENT_DATA,
        method=ForecastMethod.NONE,
        compute_time_us=now_us,
        level=level,
        level_time_us=latest_us,
        rate_per_day=None,
        sigma_per_day=None,
        days_to_empty=None,
        empty_time_us=None,
        lead_time_days=lead_days,
        review_days=0.0,
        safety_stock=0.0,
        reorder_point=fallback,
        order_now=latest_us is not None and level <= fallback,
        reorder_time_us=None,
        expected_replenishment_time_us=None,
        confidence=0.0,
        readings_used=used,
        window_start_us=window_start_us,
        epoch_start_us=None,
        observed_days=0,
        adi=None,
        explanation=f"{reason}; ordering at the fallback level of {fallback:.3g}",
    )
