"""Replenishment forecast bench: run-out accuracy and a simulated year of ordering.

Run as `.venv/bin/python bench/replenishment_forecast_bench.py`; bench/replenishment_bench.py
calls `run_forecast_accuracy` and prints its figures beside the RPC ones.

Simulated devices (services/replenishment/consumption.py), a third each steady, bursty and
intermittent, 5 to 40 units a day from a capacity of 1000, idle weeks, 0.5 % sensor noise,
rare glitches and an offline spell, one reading a day, lead times of 2 to 7 days:

1. **Accuracy.** Through a year in which each slot is refilled a day or two after it runs
   empty, every day the forecast (services/replenishment/forecast.py) and the naive
   "last two readings" baseline predict the run-out date; the truth is the model's own
   (`ConsumptionModel.runout_time_us`). Errors are absolute days, taken where the truth is
   at most 30 days away; a prediction of "never" or beyond 90 days counts as 90 days.
2. **Ordering.** The same devices for a year under four policies: ours (order when the
   forecast says the level is at or below the reorder point) at the default 95 % service
   level and at 99 % ("forecast99"; a cycle service level s should stock out in about
   1 - s of the order cycles), the naive baseline (order
   when its run-out is within the lead time) and a printer's fixed low-level warning
   (order at 20 % left). An order arrives a lead time later and refills the slot. Counted
   per device-year: stock-outs (the slot reached empty, however briefly, before a delivery;
   a customer left 3 days empty refills it by hand), days empty (seen at the daily
   reading), and early deliveries (arriving with more
   than 25 % left).
3. **Cost.** Microseconds per forecast of 200 and of 500 readings (the most the forecast
   keeps), beside the 1 ms budget of the telemetry hot path and, as a ratio that holds
   on a busy machine, beside a least-squares line through the same readings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from services.replenishment.consumption import (
    ConsumptionModel,
    OfflineSpell,
    Sensor,
    UsageKind,
    UsageProfile,
)
from services.replenishment.forecast import ForecastStatus, forecast
from services.replenishment.slots import DAY_US, HOUR_US, safety_z

START_US = 1_767_225_600 * 1_000_000  # 2026-01-01T00:00:00Z
CAPACITY = 1000.0
HORIZON_DAYS = 30.0  # accuracy is measured where the truth is this close
CAP_DAYS = 90.0  # predictions of "never" or further count as this
EARLY_SHARE = 0.25
FIXED_WARNING_SHARE = 0.2
MANUAL_REFILL_DAYS = 3
Z_99 = safety_z(0.99)
HISTORY = 400  # readings handed to the forecast (it keeps 90 days, 500 at most)


@dataclass(frozen=True)
class Device:
    profile: UsageProfile
    lead_days: int
    seed: int
    offline: tuple[OfflineSpell, ...]


def simulated_devices(count: int, seed: int, days: int) -> list[Device]:
    rng = np.random.default_rng(seed)
    kinds = (UsageKind.STEADY, UsageKind.BURSTY, UsageKind.INTERMITTENT)
    devices = []
    for i in range(count):
        offline_start = START_US + int(rng.integers(30, max(31, days - 30))) * DAY_US
        devices.append(
            Device(
                profile=UsageProfile(
                    kinds[i % 3],
                    rate_per_day=float(rng.uniform(5.0, 40.0)),
                    idle_week_share=0.05,
                ),
                lead_days=int(rng.integers(2, 8)),
                seed=seed * 10_000 + i,
                offline=(OfflineSpell(offline_start, offline_start + int(rng.integers(2, 6)) * DAY_US),),
            )
        )
    return devices


def _model(device: Device) -> ConsumptionModel:
    return ConsumptionModel(
        device.profile,
        capacity=CAPACITY,
        seed=device.seed,
        start_us=START_US,
        sensor=Sensor(noise_share=0.005, glitch_share=0.002),
        offline=device.offline,
    )


def _naive_days_left(history: list[tuple[int, float]]) -> float:
    """Run-out from the last two readings; CAP_DAYS when they show no use."""
    if len(history) < 2:
        return CAP_DAYS
    (t0, l0), (t1, l1) = history[-2], history[-1]
    rate = (l0 - l1) / ((t1 - t0) / DAY_US)
    return min(CAP_DAYS, l1 / rate) if rate > 0 else CAP_DAYS


def _ours_days_left(history: list[tuple[int, float]], now_us: int, lead_days: int) -> float | None:
    result = forecast(history[-HISTORY:], capacity=CAPACITY, lead_time_us=lead_days * DAY_US, now_us=now_us)
    if result.status is ForecastStatus.INSUFFICIENT_DATA:
        return None
    return CAP_DAYS if result.days_to_empty is None else min(CAP_DAYS, result.days_to_empty)


def _accuracy(device: Device, days: int) -> tuple[list[float], list[float], int]:
    """Absolute run-out errors (ours, naive) over a year, and how often ours had no answer."""
    model = _model(device)
    rng = np.random.default_rng(device.seed + 7)
    history: list[tuple[int, float]] = []
    ours: list[float] = []
    naive: list[float] = []
    unanswered = 0
    empty_since: int | None = None
    for day in range(days):
        now = START_US + day * DAY_US + 9 * HOUR_US
        model.advance_to(now)
        if model.level <= 0:
            empty_since = now if empty_since is None else empty_since
            if now - empty_since >= int(rng.integers(1, 3)) * DAY_US:
                model.refill()
                empty_since = None
        if not model.is_reporting(now):
            continue
        history.append((now, model.read()))
        truth_us = model.runout_time_us()
        if truth_us is None or model.level <= 0:
            continue
        truth = (truth_us - now) / DAY_US
        if truth > HORIZON_DAYS:
            continue
        predicted = _ours_days_left(history, now, device.lead_days)
        if predicted is None:
            unanswered += 1
            continue
        ours.append(abs(predicted - truth))
        naive.append(abs(_naive_days_left(history) - truth))
    return ours, naive, unanswered


Decide = Callable[[list[tuple[int, float]], int, int], bool]


def _order_ours(history: list[tuple[int, float]], now_us: int, lead_days: int) -> bool:
    return forecast(
        history[-HISTORY:], capacity=CAPACITY, lead_time_us=lead_days * DAY_US, now_us=now_us
    ).order_now


def _order_ours_99(history: list[tuple[int, float]], now_us: int, lead_days: int) -> bool:
    return forecast(
        history[-HISTORY:], capacity=CAPACITY, lead_time_us=lead_days * DAY_US, now_us=now_us, z=Z_99
    ).order_now


def _order_naive(history: list[tuple[int, float]], now_us: int, lead_days: int) -> bool:
    return _naive_days_left(history) <= lead_days


def _order_fixed(history: list[tuple[int, float]], now_us: int, lead_days: int) -> bool:
    return history[-1][1] <= FIXED_WARNING_SHARE * CAPACITY


POLICIES: dict[str, Decide] = {
    "forecast": _order_ours,
    "forecast99": _order_ours_99,
    "naive": _order_naive,
    "fixed 20%": _order_fixed,
}


@dataclass
class PolicyYear:
    orders: int = 0
    stockouts: int = 0
    empty_days: int = 0
    early: int = 0


def _ordering_year(device: Device, decide: Decide, days: int) -> PolicyYear:
    model = _model(device)
    history: list[tuple[int, float]] = []
    year = PolicyYear()
    arrival: int | None = None
    empty_for = 0
    counted = False  # this empty spell is counted
    for day in range(days):
        # Readings at 09:00 and deliveries a whole number of days after one: a daily step
        # sees every delivery, and a level that only falls shows any run-out since the last.
        now = START_US + day * DAY_US + 9 * HOUR_US
        model.advance_to(now)
        if model.level <= 0 and not counted:
            year.stockouts += 1
            counted = True
        if arrival is not None and now >= arrival:
            year.early += model.level > EARLY_SHARE * CAPACITY
            model.refill()
            arrival, empty_for, counted = None, 0, False
        elif model.level <= 0:
            year.empty_days += 1
            empty_for += 1
            if empty_for >= MANUAL_REFILL_DAYS and arrival is None:
                model.refill()
                empty_for, counted = 0, False
        if not model.is_reporting(now):
            continue
        history.append((now, model.read()))
        if arrival is None and decide(history, now, device.lead_days):
            arrival = now + device.lead_days * DAY_US
            year.orders += 1
    return year


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def forecast_cost_us(readings: int = 200, repeats: int = 300) -> tuple[float, float, float, float]:
    """Microseconds per forecast of `readings` readings over 90 days, with a refill two
    thirds in: (median, min, max) of five runs, and the median of a reference measured
    alternately with it, a least-squares line through the same readings (numpy.polyfit):
    the ratio holds when other work shares the cores."""
    model = _model(simulated_devices(1, 99, 120)[0])
    history = []
    for step in range(readings):
        model.advance_to(START_US + step * 90 * DAY_US // readings)
        if step == readings * 2 // 3:
            model.refill()
        history.append((model.now_us, model.read()))
    now = model.now_us + HOUR_US
    samples, reference = [], []
    for _ in range(5):
        began = time.perf_counter()
        for _ in range(repeats):
            forecast(history, capacity=CAPACITY, lead_time_us=3 * DAY_US, now_us=now)
        samples.append((time.perf_counter() - began) / repeats * 1e6)
        began = time.perf_counter()
        for _ in range(repeats):
            pairs = np.array(history, dtype=float)
            np.polyfit(pairs[:, 0] / DAY_US, pairs[:, 1], 1)
        reference.append((time.perf_counter() - began) / repeats * 1e6)
    return statistics.median(samples), min(samples), max(samples), statistics.median(reference)


def run_forecast_accuracy(devices: int = 36, days: int = 365, seed: int = 11) -> dict[str, float]:
    """The bench's figures: run-out errors in days, per-device-year ordering counts, cost."""
    fleet = simulated_devices(devices, seed, days)
    ours: list[float] = []
    naive: list[float] = []
    unanswered = 0
    for device in fleet:
        o, n, u = _accuracy(device, days)
        ours += o
        naive += n
        unanswered += u
    figures: dict[str, float] = {
        "devices": devices,
        "days": days,
        "runout_points": len(ours),
        "runout_unanswered": unanswered,
        "runout_median_abs_days_forecast": _percentile(ours, 50),
        "runout_p90_abs_days_forecast": _percentile(ours, 90),
        "runout_median_abs_days_naive": _percentile(naive, 50),
        "runout_p90_abs_days_naive": _percentile(naive, 90),
    }
    figures["runout_median_ratio"] = (
        figures["runout_median_abs_days_forecast"] / figures["runout_median_abs_days_naive"]
    )
    figures["runout_p90_ratio"] = (
        figures["runout_p90_abs_days_forecast"] / figures["runout_p90_abs_days_naive"]
    )
    years = devices * days / 365.0
    for name, decide in POLICIES.items():
        total = PolicyYear()
        for device in fleet:
            year = _ordering_year(device, decide, days)
            total.orders += year.orders
            total.stockouts += year.stockouts
            total.empty_days += year.empty_days
            total.early += year.early
        key = name.split()[0]
        figures[f"orders_per_device_year_{key}"] = total.orders / years
        figures[f"stockouts_per_device_year_{key}"] = total.stockouts / years
        figures[f"empty_days_per_device_year_{key}"] = total.empty_days / years
        figures[f"early_per_device_year_{key}"] = total.early / years
    for size in (200, 500):
        median, low, high, line = forecast_cost_us(size)
        figures[f"forecast_us_per_{size}_readings"] = median
        figures[f"polyfit_us_per_{size}_readings"] = line
        figures[f"forecast_us_per_{size}_readings_min"] = low
        figures[f"forecast_us_per_{size}_readings_max"] = high
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=36)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    began = time.perf_counter()
    f = run_forecast_accuracy(args.devices, args.days, args.seed)
    print(f"forecast accuracy: {args.devices} simulated devices x {args.days} days, a reading a day")
    print(
        f"  run-out error (|predicted - true| days, truth <= {HORIZON_DAYS:.0f} days away, "
        f"{int(f['runout_points'])} points; {int(f['runout_unanswered'])} without enough data):"
    )
    print(
        f"    forecast  median {f['runout_median_abs_days_forecast']:.2f}  p90 {f['runout_p90_abs_days_forecast']:.2f}"
    )
    print(
        f"    naive     median {f['runout_median_abs_days_naive']:.2f}  p90 {f['runout_p90_abs_days_naive']:.2f}"
    )
    print(
        f"    ratio     median {f['runout_median_ratio']:.2f}x  p90 {f['runout_p90_ratio']:.2f}x (lower is better)"
    )
    print("  a simulated year of ordering, per device-year:")
    print(
        f"    {'policy':<10} {'orders':>7} {'stock-outs':>11} {'days empty':>11} {'early':>7}"
        "   (95 % service level: stock-outs about 0.05 x orders)"
    )
    for name in POLICIES:
        key = name.split()[0]
        print(
            f"    {name:<10} {f[f'orders_per_device_year_{key}']:>7.2f}"
            f" {f[f'stockouts_per_device_year_{key}']:>11.2f}"
            f" {f[f'empty_days_per_device_year_{key}']:>11.2f} {f[f'early_per_device_year_{key}']:>7.2f}"
        )
    for size in (200, 500):
        cost = f[f"forecast_us_per_{size}_readings"]
        print(
            f"  cost: {cost:.0f} us per forecast of {size} readings (5 runs: "
            f"{f[f'forecast_us_per_{size}_readings_min']:.0f}-{f[f'forecast_us_per_{size}_readings_max']:.0f}), "
            f"{cost / 1000:.2f}x the 1 ms budget; "
            f"{cost / f[f'polyfit_us_per_{size}_readings']:.1f}x a numpy.polyfit line through them"
        )
    print(f"  bench time {time.perf_counter() - began:.1f} s")


if __name__ == "__main__":
    main()
