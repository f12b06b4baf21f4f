"""The device simulator's own parts, without a server: its clock, what a device reports,
the device file. (With a real server: tests/integration/test_replenishment_simulator.py.)"""

from __future__ import annotations

import importlib
import re
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from services.replenishment import simulator
from services.replenishment.consumption import ConsumptionModel, OfflineSpell, Sensor, UsageKind, UsageProfile
from services.replenishment.simulator import (
    DeviceBook,
    DeviceCredentials,
    SimClock,
    SimulatedDevice,
    SlotPlay,
    Stats,
    demo_start_level,
    offline_spells,
    request_id_for,
    simulated_specs,
    usage_of,
)
from services.replenishment.slots import DAY_US, HOUR_US

T0 = 1_767_225_600 * 1_000_000  # 2026-01-01T00:00:00Z
ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class FakeRealClock:
    def __init__(self, now_us: int):
        self.now = now_us

    def __call__(self) -> int:
        return self.now


def test_the_clock_replays_the_past_at_its_speed_then_keeps_to_the_real_clock():
    real = FakeRealClock(T0 + 10 * DAY_US)
    clock = SimClock.replaying(10 * DAY_US, speed=86_400.0, real_us=real)
    assert clock.now_us() == T0 and not clock.caught_up()
    real.now += 3 * 1_000_000  # three real seconds: three simulated days
    assert clock.now_us() == T0 + 3 * DAY_US
    assert clock.real_seconds_for(DAY_US) == pytest.approx(1.0)
    real.now += 20 * 1_000_000  # far past the real clock: never ahead of it
    assert clock.now_us() == real.now and clock.caught_up()
    assert clock.real_seconds_for(HOUR_US) == pytest.approx(3600.0)
    with pytest.raises(ValueError):
        SimClock(T0, speed=0.5)


def device(offline: tuple[OfflineSpell, ...] = (), interval_us: int = 6 * HOUR_US) -> SimulatedDevice:
    model = ConsumptionModel(
        UsageProfile(UsageKind.STEADY, 10.0),
        capacity=100.0,
        seed=3,
        start_us=T0,
        level=80.0,
        sensor=Sensor(noise_share=0.0),
        offline=offline,
    )
    credentials = DeviceCredentials("filter", "dev_1", "cust-1", "water_filter", "token")
    return SimulatedDevice(credentials, [SlotPlay("filter", 100.0, 2 * DAY_US, model, T0)], interval_us)


def test_a_device_reports_each_slot_every_interval_with_ids_that_repeat_on_a_replay():
    first = device()
    readings = first.due_readings(T0 + 2 * DAY_US)
    assert len(readings) == 9  # 0, 6, 12, ... 48 hours
    times = [r.measure_time.ToMicroseconds() for r in readings]
    assert times == [T0 + n * 6 * HOUR_US for n in range(9)]
    assert all(ID.match(r.reading_id) for r in readings) and len({r.reading_id for r in readings}) == 9
    levels = [r.level for r in readings]
    assert levels == sorted(levels, reverse=True) and levels[0] == 80.0 and 55 < levels[-1] < 65
    # The same device played again (a restart) names the same readings: the server sees DUPLICATEs.
    assert [r.reading_id for r in device().due_readings(T0 + 2 * DAY_US)] == [r.reading_id for r in readings]
    # Unanswered readings stay buffered; an answer removes them.
    assert first.due_readings(T0 + 2 * DAY_US) == readings
    first.answered(len(readings), Reply(), Stats())
    assert first.due_readings(T0 + 2 * DAY_US) == []


class Reply:
    results: tuple = ()
    slot_outcomes: tuple = ()


def test_a_delivery_refills_the_slot_before_its_next_reading():
    simulated = device()
    simulated.due_readings(T0 + DAY_US)
    simulated.answered(len(simulated.pending), Reply(), Stats())
    simulated.refill("filter")
    simulated.refill("no-such-slot")  # another device's slot name: nothing happens
    after = simulated.due_readings(T0 + DAY_US + 6 * HOUR_US)
    assert [r.level for r in after] == [100.0]


def test_an_offline_device_sends_nothing_during_its_spell():
    spell = OfflineSpell(T0 + DAY_US, T0 + 2 * DAY_US)
    readings = device(offline=(spell,)).due_readings(T0 + 3 * DAY_US)
    times = [r.measure_time.ToMicroseconds() for r in readings]
    assert not any(spell.covers(t) for t in times)
    assert len(times) == 13 - 4


def test_the_device_file_keeps_names_ids_and_tokens_privately(tmp_path):
    path = tmp_path / "devices.json"
    book = DeviceBook(path)
    book.put(DeviceCredentials("printer", "dev_2", "cust-2", "printer", "secret"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = DeviceBook(path)
    assert again.entries["printer"].token == "secret"
    assert again.entries["printer"].principal == "device:dev_2"
    path.write_text("not json")
    assert DeviceBook(path).entries == {}


def test_request_ids_are_valid_whatever_they_name():
    assert request_id_for("ship", "ord_1") == "ship-ord_1"
    long = request_id_for("deliver", "x" * 100)
    assert ID.match(long) and long.startswith("deliver-")
    assert request_id_for("a", "b c") != request_id_for("a", "b_c") and ID.match(request_id_for("a", "b c"))


def test_demo_levels_reach_the_reorder_point_late_in_the_replay():
    history = 20 * DAY_US
    level = demo_start_level(history)
    water = DeviceCredentials("water-filter", "dev_w", "c", "water_filter", "t")
    start = level(water, 100.0)
    rate = usage_of("water_filter", 100.0).rate_per_day
    days_left_at_the_end = start / rate - 20
    assert 1 <= days_left_at_the_end <= 4


def test_simulated_specs_are_distinct_devices_of_every_kind():
    specs = simulated_specs(6, "c-")
    assert len({s.serial_number for s in specs}) == 6
    assert {s.kind for s in specs} == {"water_filter", "printer", "coffee_machine"}
    request = specs[0].register_request()
    assert ID.match(request.request_id) and request.slots[0].policy == 1


def test_each_device_goes_offline_once_early_in_the_replay():
    real = FakeRealClock(T0 + 20 * DAY_US)
    clock = SimClock.replaying(20 * DAY_US, speed=86_400.0, real_us=real)
    spells = offline_spells(clock, 1.5)
    water = DeviceCredentials("water-filter", "dev_w", "c", "water_filter", "t")
    [spell] = spells(water)
    assert spells(water) == (spell,)  # the same for the same device
    assert T0 <= spell.start_us <= T0 + 10 * DAY_US and spell.end_us == spell.start_us + int(1.5 * DAY_US)
    assert offline_spells(clock, 0)(water) == ()


def test_the_simulator_runs_as_a_console_script_and_as_a_module():
    root = Path(__file__).resolve().parents[2]
    scripts = tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["najimi-device-simulator"].partition(":")
    assert getattr(importlib.import_module(module), function) is simulator.main
    shown = subprocess.run(
        [sys.executable, "-m", "services.replenishment.simulator", "--help"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "--offline-days" in shown.stdout
