"""Every service process exits 0 on every stop: SIGTERM or SIGINT at any moment, from the
instant it is started (before Python has run a line of it) through its imports, its
start-up work and serving, and again while it stops, once or many times."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.processes import ServiceProcess
from shared.settings import SERVICE_NAMES
from tests.e2e.conftest import Suite


def at_once(process: ServiceProcess) -> None:
    process.process.send_signal(signal.SIGTERM)


def sigint_at_once(process: ServiceProcess) -> None:
    process.process.send_signal(signal.SIGINT)


def while_importing(process: ServiceProcess) -> None:
    time.sleep(0.15)  # a moment into start-up, not a synchronisation: any moment must do
    process.process.send_signal(signal.SIGTERM)


def during_start_up_work(process: ServiceProcess) -> None:
    assert process.wait_listening(60)
    process.process.send_signal(signal.SIGTERM)  # the migrations run now


def twice_during_start_up(process: ServiceProcess) -> None:
    assert process.wait_listening(60)
    process.process.send_signal(signal.SIGTERM)
    process.process.send_signal(signal.SIGINT)


def serving(process: ServiceProcess) -> None:
    process.wait_serving()
    process.process.send_signal(signal.SIGTERM)


def twice_in_a_row(process: ServiceProcess) -> None:
    process.wait_serving()
    process.process.send_signal(signal.SIGTERM)
    process.process.send_signal(signal.SIGTERM)


def again_while_stopping(process: ServiceProcess) -> None:
    process.wait_serving()
    process.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not any('"stopping"' in line for line in process.lines) and process.process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    process.process.send_signal(signal.SIGINT)  # no-op if it has already exited


def until_it_exits(process: ServiceProcess) -> None:
    """A signal every millisecond from start-up to exit, the last ones after the event loop
    has closed."""
    assert process.wait_listening(60)
    deadline = time.monotonic() + 30
    while process.process.poll() is None:
        assert time.monotonic() < deadline
        process.process.send_signal(signal.SIGTERM)
        time.sleep(0.001)


MOMENTS: list[Callable[[ServiceProcess], None]] = [
    at_once,
    while_importing,
    during_start_up_work,
    serving,
    twice_in_a_row,
    again_while_stopping,
    until_it_exits,
    twice_during_start_up,
    sigint_at_once,
]
CYCLES = [
    (name, moment) for position, moment in enumerate(MOMENTS) for name in SERVICE_NAMES[position % 2 :: 2]
]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Suite:
    # Nothing listens at the other services' addresses: each starts and stops on its own.
    return Suite(tmp_path_factory.mktemp("signals"))


@pytest.mark.parametrize(("name", "moment"), CYCLES, ids=[f"{n}-{m.__name__}" for n, m in CYCLES])
def test_a_stop_signal_at_any_moment_exits_zero(suite: Suite, name: str, moment, tmp_path: Path):
    process = ServiceProcess(name, suite.env_for(name), tmp_path / f"{name}.log")
    try:
        moment(process)
        code = process.process.wait(30)
    finally:
        process.terminate()
    output = "".join(process.lines[-20:])
    assert code == 0, output
    assert "Traceback" not in "".join(process.lines), output
