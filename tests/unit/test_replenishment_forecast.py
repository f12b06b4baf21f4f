"""The replenishment forecast on synthetic series with known answers, and the consumption models."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.lib.stride_tricks import sliding_window_view

from services.replenishment.consumption import (
    ConsumptionModel,
    OfflineSpell,
    Scenario,
    Sensor,
    UsageKind,
    UsageProfile,
    make_series,
)
from services.replenishment.forecast import (
    ForecastMethod,
    ForecastStatus,
    croston_sba,
    detect_refills,
    forecast,
    is_refill,
    tsb,
    window_medians,
)
from services.replenishment.slots import DAY_US, HOUR_US

T0 = 1_767_225_600 * 1_000_000 + 9 * HOUR_US  # 2026-01-01T09:00:00Z
LEAD = 3 * DAY_US


def linear(
    days: int, rate: float = 20.0, start: float = 1000.0, first_day: int = 0
) -> list[tuple[int, float]]:
    return [(T0 + d * DAY_US, start - rate * (d - first_day)) for d in range(first_day, first_day + days)]


def now_after(readings: list[tuple[int, float]], hours: int = 0) -> int:
    return max(t for t, _ in readings) + hours * HOUR_US


# Known answers -----------------------------------------------------------------------


def test_steady_noise_free_series_gives_the_exact_rate_and_dates() -> None:
    readings = linear(21)  # 1000 down to 600, 20 a day
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings), review_us=0)
    assert result.status is ForecastStatus.READY
    assert result.method is ForecastMethod.MEAN
    assert result.rate_per_day == pytest.approx(20.0)
    assert result.sigma_per_day == pytest.approx(0.0, abs=1e-9)
    assert result.level == pytest.approx(600.0)
    assert result.days_to_empty == pytest.approx(30.0)
    assert result.safety_stock == pytest.approx(0.0, abs=1e-6)
    assert result.reorder_point == pytest.approx(60.0)
    assert not result.order_now
    now = now_after(readings)
    assert result.reorder_time_us == pytest.approx(now + 27 * DAY_US, abs=1)
    assert result.expected_replenishment_time_us == pytest.approx(now + 30 * DAY_US, abs=1)
    assert result.empty_time_us == pytest.approx(now + 30 * DAY_US, abs=1)
    assert result.readings_used == 21
    assert result.observed_days == 20
    assert result.confidence == pytest.approx(1.0)
    assert result.explanation == "about 30 days left; shipping takes 3; ordering when 3 days remain"


def test_level_is_extrapolated_to_now_and_the_order_is_due_at_the_reorder_point() -> None:
    readings = linear(21)  # 600 at the latest reading
    now = now_after(readings, hours=24 * 26)  # 26 days later: 80 left, 4 days
    result = forecast(
        readings, capacity=1000, lead_time_us=LEAD, now_us=now, stale_after_us=60 * DAY_US, review_us=0
    )
    assert result.level == pytest.approx(80.0)
    assert result.days_to_empty == pytest.approx(4.0)
    assert not result.order_now
    result = forecast(
        readings,
        capacity=1000,
        lead_time_us=LEAD,
        now_us=now + DAY_US,
        stale_after_us=60 * DAY_US,
        review_us=0,
    )
    assert result.order_now
    assert result.reorder_time_us == now + DAY_US
    assert result.expected_replenishment_time_us == now + DAY_US + LEAD
    assert "ordering now" in result.explanation


def test_safety_stock_is_z_sigma_root_lead() -> None:
    rng = np.random.default_rng(3)
    daily = rng.normal(20.0, 5.0, 40).clip(0)
    levels = 1000.0 - np.concatenate(([0.0], np.cumsum(daily)))
    readings = [(T0 + d * DAY_US, float(v)) for d, v in enumerate(levels)]
    now = now_after(readings)
    result = forecast(readings, capacity=1000, lead_time_us=4 * DAY_US, now_us=now, z=2.0, review_us=0)
    assert result.rate_per_day == pytest.approx(daily.mean())
    assert result.sigma_per_day == pytest.approx(daily.std(ddof=1))
    assert result.safety_stock == pytest.approx(2.0 * daily.std(ddof=1) * 2.0)
    assert result.reorder_point == pytest.approx(4 * daily.mean() + result.safety_stock)
    # By default the stock must also last until the next reading, a day later here.
    reviewed = forecast(readings, capacity=1000, lead_time_us=4 * DAY_US, now_us=now, z=2.0)
    assert reviewed.review_days == pytest.approx(1.0)
    assert reviewed.safety_stock == pytest.approx(2.0 * daily.std(ddof=1) * 5**0.5)
    assert reviewed.reorder_point == pytest.approx(5 * daily.mean() + reviewed.safety_stock)


@pytest.mark.parametrize("seed", range(1, 6))
def test_steady_noisy_sensor_rate_and_run_out_close_to_the_truth(seed: int) -> None:
    series = make_series(Scenario.STEADY, seed=seed, days=30, rate_per_day=20.0)
    result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
    assert result.status is ForecastStatus.READY
    assert result.rate_per_day == pytest.approx(20.0, rel=0.1)
    assert result.level == pytest.approx(series.level_at_end, abs=25.0)
    truth = series.true_days_to_empty()
    assert truth is not None and result.days_to_empty == pytest.approx(truth, abs=2.0)


def test_bursty_use_rate_is_the_realised_mean_not_a_median() -> None:
    errors, methods = [], set()
    for seed in range(1, 9):
        series = make_series(Scenario.BURSTY, seed=seed, days=40, rate_per_day=20.0)
        result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
        span = (series.readings[-1][0] - series.readings[0][0]) / DAY_US
        realised = (series.true_levels[0] - series.true_levels[-1]) / span
        methods.add(result.method)
        if result.method is ForecastMethod.MEAN:
            assert result.rate_per_day == pytest.approx(realised, rel=0.02)
        else:  # sparse enough to be intermittent: TSB weighs recent days more
            assert result.rate_per_day == pytest.approx(realised, rel=0.25)
        errors.append(abs(result.level - series.level_at_end))
    assert methods == {ForecastMethod.MEAN, ForecastMethod.TSB}
    assert statistics.median(errors) < 30.0


def test_intermittent_use_twice_a_week_is_detected_and_forecast_with_tsb() -> None:
    # 35 units on Mondays and Thursdays, read daily: 10 a day on average.
    level, readings = 1000.0, []
    for d in range(56):
        readings.append((T0 + d * DAY_US, level))
        if d % 7 in (0, 3):
            level -= 35.0
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings))
    assert result.method is ForecastMethod.TSB
    assert result.adi == pytest.approx(3.5, abs=0.1)
    assert result.rate_per_day == pytest.approx(10.0, rel=0.05)
    assert result.sigma_per_day is not None and result.sigma_per_day > result.rate_per_day
    assert result.level == pytest.approx(level)  # a staircase's level is its last step


def test_intermittent_scenario_over_seeds_tracks_the_realised_rate() -> None:
    ratios = []
    for seed in range(1, 9):
        series = make_series(Scenario.INTERMITTENT, seed=seed, days=60, every_us=DAY_US, rate_per_day=10.0)
        result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
        span = (series.readings[-1][0] - series.readings[0][0]) / DAY_US
        realised = (series.true_levels[0] - series.true_levels[-1]) / span
        assert result.method is ForecastMethod.TSB
        ratios.append(result.rate_per_day / realised)
    assert 0.8 < statistics.median(ratios) < 1.25


def test_a_printer_no_longer_used_stops_looking_due() -> None:
    # Used twice a week for eight weeks, then not at all for five.
    level, readings = 1000.0, []
    for d in range(56 + 35):
        readings.append((T0 + d * DAY_US, level))
        if d < 56 and d % 7 in (0, 3):
            level -= 35.0
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings))
    assert result.method is ForecastMethod.TSB
    assert result.rate_per_day is not None and result.rate_per_day < 0.3 * 10.0
    assert result.days_to_empty is not None and result.days_to_empty > 4 * 440.0 / 10.0


def test_tsb_and_croston_sba_follow_the_papers_recursions() -> None:
    rate, p, size = tsb(np.array([0.0, 0.0, 0.0, 10.0]), alpha=0.1, beta=0.05)
    expected_p = 0.25 * 0.95**3
    expected_p += 0.05 * (1 - expected_p)
    assert p == pytest.approx(expected_p)
    assert size == pytest.approx(10.0)
    assert rate == pytest.approx(expected_p * 10.0)
    # sizes 10, 20 at intervals 4, 2: z = 10 + 0.1 (20 - 10); q = 3 + 0.1 (2 - 3)
    assert croston_sba(np.array([0, 0, 0, 10, 0, 20.0]), alpha=0.1) == pytest.approx(0.95 * 11.0 / 2.9)
    assert tsb(np.zeros(5)) == (0.0, 0.0, 0.0)
    assert croston_sba(np.zeros(5)) == 0.0


def test_tsb_decays_when_use_stops_where_croston_keeps_ordering() -> None:
    used = np.tile([35.0, 0, 0, 35.0, 0, 0, 0], 8)
    stopped = np.concatenate((used, np.zeros(42)))
    assert tsb(stopped)[0] < 0.25 * tsb(used)[0]
    assert croston_sba(stopped) == pytest.approx(croston_sba(used))


def test_refill_mid_series_starts_a_new_epoch_and_keeps_the_rate() -> None:
    readings = linear(10) + linear(10, start=990.0, first_day=10)
    assert detect_refills(readings, capacity=1000) == [T0 + 10 * DAY_US]
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings))
    assert result.epoch_start_us == T0 + 10 * DAY_US
    assert result.rate_per_day == pytest.approx(20.0)
    assert result.level == pytest.approx(990.0 - 9 * 20.0)
    assert result.observed_days == 18  # the gap across the refill is not observed


def test_refill_in_a_noisy_scenario_is_found_once() -> None:
    for seed in range(1, 6):
        series = make_series(Scenario.REFILL, seed=seed, days=40)
        (refill_time,) = series.refill_times_us
        first_after = min(t for t, _ in series.readings if t >= refill_time)
        assert detect_refills(series.readings, capacity=series.capacity) == [first_after]
        result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
        assert result.rate_per_day == pytest.approx(20.0, rel=0.1)


def test_an_upward_spike_is_not_a_refill_and_does_not_move_the_rate() -> None:
    readings = linear(21)
    readings[10] = (readings[10][0], readings[10][1] + 300.0)
    readings[15] = (readings[15][0], readings[15][1] - 200.0)  # a low glitch
    assert detect_refills(readings, capacity=1000) == []
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings))
    assert result.rate_per_day == pytest.approx(20.0, rel=0.02)
    assert result.readings_used == 19


def test_refill_tolerance_is_five_percent_of_capacity() -> None:
    assert not is_refill([500.0], 549.0, 1000.0)
    assert is_refill([500.0], 551.0, 1000.0)
    assert not is_refill([], 1000.0, 1000.0)
    # Measured from the median of the last five: one low glitch among them does not count.
    assert not is_refill([900.0, 530.0, 520.0, 10.0, 510.0, 505.0], 549.0, 1000.0)
    assert is_refill([520.0, 10.0, 510.0, 505.0, 500.0], 560.0, 1000.0)
    small_top_up = linear(10) + linear(10, start=835.0, first_day=10)  # +35 over 820
    assert detect_refills(small_top_up, capacity=1000) == []


def test_a_device_that_stops_reporting_is_stale_and_extrapolated() -> None:
    series = make_series(Scenario.STOPPED, seed=4, days=45)
    result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
    assert result.status is ForecastStatus.STALE
    assert result.explanation.startswith("no reading for 16 days; ")  # 15.6
    assert result.confidence < 0.05
    truth = series.true_days_to_empty()
    assert result.level == pytest.approx(series.level_at_end, abs=40.0)
    assert truth is not None and result.days_to_empty == pytest.approx(truth, abs=2.0)
    fresh = forecast(
        series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.last_report_us or 0
    )
    assert fresh.status is ForecastStatus.READY
    assert fresh.confidence > 0.8


def test_noisy_glitchy_sensor_over_seeds() -> None:
    errors = []
    for seed in range(1, 12):
        series = make_series(Scenario.NOISY, seed=seed, days=40)
        result = forecast(series.readings, capacity=series.capacity, lead_time_us=LEAD, now_us=series.end_us)
        assert result.rate_per_day == pytest.approx(20.0, rel=0.15)
        truth = series.true_days_to_empty()
        assert truth is not None and result.days_to_empty is not None
        errors.append(abs(result.days_to_empty - truth))
    assert statistics.median(errors) < 1.5


def test_out_of_order_and_repeated_readings_give_the_same_forecast() -> None:
    series = make_series(Scenario.REFILL, seed=2, days=30, every_us=6 * HOUR_US)
    shuffled = list(series.readings)
    random.Random(5).shuffle(shuffled)
    in_order = forecast(series.readings, capacity=1000, lead_time_us=LEAD, now_us=series.end_us)
    assert forecast(shuffled, capacity=1000, lead_time_us=LEAD, now_us=series.end_us) == in_order
    # The same measure_time again (a replacement) counts once.
    repeated = [*shuffled, series.readings[3]]
    assert forecast(repeated, capacity=1000, lead_time_us=LEAD, now_us=series.end_us) == in_order


def test_too_few_readings_fall_back_to_the_slot_level() -> None:
    none = forecast([], capacity=1000, lead_time_us=LEAD, now_us=T0)
    assert none.status is ForecastStatus.INSUFFICIENT_DATA
    assert none.reorder_point == 200.0
    assert not none.order_now
    assert none.rate_per_day is None and none.days_to_empty is None
    assert none.confidence == 0.0
    two = forecast(linear(2), capacity=1000, lead_time_us=LEAD, now_us=T0 + DAY_US)
    assert two.status is ForecastStatus.INSUFFICIENT_DATA
    assert two.level == 980.0
    low = forecast([(T0, 150.0)], capacity=1000, lead_time_us=LEAD, now_us=T0, fallback_reorder_level=150.0)
    assert low.order_now
    assert "fallback level of 150" in low.explanation
    # Three readings within a day: no whole observed day yet.
    hours = [(T0 + h * HOUR_US, 1000.0 - h) for h in range(3)]
    assert (
        forecast(hours, capacity=1000, lead_time_us=LEAD, now_us=T0).status
        is ForecastStatus.INSUFFICIENT_DATA
    )


def test_non_finite_levels_are_ignored_and_capacity_must_be_positive() -> None:
    readings = linear(21)
    dirty = [*readings, (T0 + 3 * DAY_US + 1, float("nan")), (T0 + 5 * DAY_US + 1, float("inf"))]
    now = now_after(readings)
    assert forecast(dirty, capacity=1000, lead_time_us=LEAD, now_us=now) == forecast(
        readings, capacity=1000, lead_time_us=LEAD, now_us=now
    )
    with pytest.raises(ValueError, match="capacity"):
        forecast(readings, capacity=0.0, lead_time_us=LEAD, now_us=now)


def test_no_consumption_is_said_and_nothing_is_ordered() -> None:
    flat = [(T0 + d * DAY_US, 700.0) for d in range(10)]
    result = forecast(flat, capacity=1000, lead_time_us=LEAD, now_us=now_after(flat))
    assert result.status is ForecastStatus.NO_CONSUMPTION
    assert result.rate_per_day == 0.0
    assert result.days_to_empty is None and result.reorder_time_us is None
    assert not result.order_now
    assert result.explanation == "no consumption seen over 9 days; nothing to order"
    assert result.confidence == pytest.approx(9 / 14, abs=1e-3)


def test_days_sitting_empty_do_not_dilute_the_rate() -> None:
    readings = linear(51) + [(T0 + d * DAY_US, 0.0) for d in range(51, 71)]
    result = forecast(readings, capacity=1000, lead_time_us=LEAD, now_us=now_after(readings))
    assert result.rate_per_day == pytest.approx(20.0)
    assert result.order_now
    assert result.level == 0.0


def test_only_the_window_is_used() -> None:
    old = [(T0 + d * DAY_US, 1000.0 - 2.0 * d) for d in range(100)]  # 2 a day, long ago
    recent = linear(30, rate=10.0, start=800.0, first_day=100)
    result = forecast(old + recent, capacity=1000, lead_time_us=LEAD, now_us=now_after(recent))
    assert result.window_start_us == T0 + (129 - 90) * DAY_US
    assert result.readings_used == 91


# Properties ------------------------------------------------------------------------------

readings_strategy = st.lists(
    st.tuples(
        st.integers(0, 200 * DAY_US).map(lambda t: T0 + t),
        st.floats(0.0, 1000.0, allow_nan=False),
    ),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(readings=readings_strategy, lead_days=st.floats(0.05, 60.0), z=st.floats(0.0, 3.1))
def test_any_readings_give_a_sane_forecast(
    readings: list[tuple[int, float]], lead_days: float, z: float
) -> None:
    now = max((t for t, _ in readings), default=T0) + HOUR_US
    result = forecast(readings, capacity=1000.0, lead_time_us=int(lead_days * DAY_US), now_us=now, z=z)
    assert 0.0 <= result.level <= 1000.0
    assert 0.0 <= result.confidence <= 1.0
    assert 0.0 <= result.reorder_point <= 1000.0
    assert result.safety_stock >= 0.0
    if result.rate_per_day is not None:
        assert result.rate_per_day >= 0.0
        assert result.sigma_per_day is not None and result.sigma_per_day >= 0.0
    if result.days_to_empty is not None:
        assert result.days_to_empty >= 0.0
        assert result.order_now == (result.level <= result.reorder_point)
    assert result.explanation and "\n" not in result.explanation


@settings(max_examples=80, deadline=None)
@given(
    daily=st.lists(st.floats(0.0, 15.0, allow_nan=False), min_size=5, max_size=40),
    lower=st.floats(0.0, 200.0),
)
def test_days_to_empty_is_monotone_in_the_level(daily: list[float], lower: float) -> None:
    levels = 1000.0 - np.concatenate(([0.0], np.cumsum(daily)))
    readings = [(T0 + d * DAY_US, float(v)) for d, v in enumerate(levels)]
    shifted = [(t, v - lower) for t, v in readings]
    now = now_after(readings)
    high = forecast(readings, capacity=1000.0, lead_time_us=LEAD, now_us=now)
    low = forecast(shifted, capacity=1000.0, lead_time_us=LEAD, now_us=now)
    assert low.rate_per_day == pytest.approx(high.rate_per_day)
    if high.days_to_empty is not None and low.days_to_empty is not None:
        assert low.days_to_empty <= high.days_to_empty + 1e-9
        assert low.order_now >= high.order_now


# Consumption models ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(UsageKind))
def test_the_path_does_not_depend_on_how_time_is_stepped(kind: UsageKind) -> None:
    profile = UsageProfile(kind, 15.0, idle_week_share=0.1)
    hourly = ConsumptionModel(profile, capacity=500, seed=9, start_us=T0)
    daily = ConsumptionModel(profile, capacity=500, seed=9, start_us=T0)
    ahead = daily.level_at(T0 + 20 * DAY_US)
    runout = daily.runout_time_us()
    for day in range(1, 21):
        for _ in range(24):
            hourly.advance(HOUR_US)
        assert daily.advance_to(T0 + day * DAY_US) == pytest.approx(hourly.level)
    assert daily.level == pytest.approx(ahead)
    assert runout is not None
    assert daily.level_at(runout) == 0.0 or daily.level == 0.0
    if runout > daily.now_us + HOUR_US:
        assert daily.level_at(runout - HOUR_US) > 0.0


def test_the_mean_use_matches_the_profile_rate() -> None:
    for kind in UsageKind:
        model = ConsumptionModel(UsageProfile(kind, 10.0), capacity=1e9, seed=1, start_us=T0)
        used = 1e9 - model.advance_to(T0 + 730 * DAY_US)
        assert used / 730 == pytest.approx(10.0, rel=0.1), kind


def test_refill_readings_and_offline_spells() -> None:
    model = ConsumptionModel(
        UsageProfile(UsageKind.STEADY, 100.0),
        capacity=1000,
        seed=2,
        start_us=T0,
        sensor=Sensor(noise_share=0.0, resolution=0.5),
        offline=(OfflineSpell(T0 + 2 * DAY_US, T0 + 3 * DAY_US), OfflineSpell(T0 + 9 * DAY_US)),
    )
    model.advance_to(T0 + DAY_US)
    assert model.read() == round(model.level * 2) / 2
    first_runout = model.runout_time_us()
    model.refill()
    assert model.level == 1000.0
    assert model.runout_time_us() != first_runout
    assert model.is_reporting(T0 + DAY_US)
    assert not model.is_reporting(T0 + 2 * DAY_US)
    assert model.is_reporting(T0 + 3 * DAY_US)
    assert not model.is_reporting(T0 + 400 * DAY_US)
    with pytest.raises(ValueError):
        model.advance_to(T0)
    with pytest.raises(ValueError):
        ConsumptionModel(UsageProfile(UsageKind.STEADY, 1.0), capacity=0, seed=1, start_us=T0)


def test_series_are_reproducible_by_seed() -> None:
    a = make_series(Scenario.NOISY, seed=7, days=20)
    assert a == make_series(Scenario.NOISY, seed=7, days=20)
    assert a != make_series(Scenario.NOISY, seed=8, days=20)
    assert len(make_series(Scenario.STOPPED, seed=1, days=30).readings) == 20


@pytest.mark.parametrize("seed", range(20))
def testwindow_medians_are_the_medians_of_five(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 4, 60).astype(float) if seed % 2 else rng.normal(size=60)
    expected = np.partition(sliding_window_view(values, 5), 2, axis=1)[:, 2]
    assert np.array_equal(window_medians(values), expected)
