"""The running suite the fuzz tests call, and how many examples they try.

NAJIMI_FUZZ_PROFILE picks the Hypothesis profile: `ci` (the default, what `make test`
runs: a few examples per RPC, the same ones every run) or `fuzz` (`make fuzz`: many
more, new ones every run). NAJIMI_FUZZ_EXAMPLES overrides the examples per RPC and test.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.fuzz.rpcs import discover_rpcs
from tests.fuzz.suite import FuzzSuite

PROFILE = os.environ.get("NAJIMI_FUZZ_PROFILE", "ci")
EXAMPLES = {"ci": 25, "fuzz": 400}
_SLOW_IS_FINE = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.filter_too_much,
    HealthCheck.large_base_example,
    HealthCheck.function_scoped_fixture,
]
settings.register_profile(
    "ci",
    max_examples=EXAMPLES["ci"],
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_IS_FINE,
)
settings.register_profile(
    "fuzz",
    max_examples=EXAMPLES["fuzz"],
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=_SLOW_IS_FINE,
)
if PROFILE not in EXAMPLES:
    raise pytest.UsageError(f"NAJIMI_FUZZ_PROFILE must be one of {', '.join(EXAMPLES)}, not {PROFILE!r}")
FUZZ_SETTINGS = settings(
    settings.get_profile(PROFILE),
    max_examples=int(os.environ.get("NAJIMI_FUZZ_EXAMPLES") or EXAMPLES[PROFILE]),
)
# `ci` replays the same examples every run (a seed per RPC); `fuzz` explores.
DERANDOMIZE = PROFILE == "ci"

RPCS = discover_rpcs()
MEMORY: list[tuple[str, int]] = []  # the suite's memory samples, for the summary


@pytest.fixture(scope="package")
def fuzz_suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzSuite]:
    suite = FuzzSuite(tmp_path_factory.mktemp("fuzz"), MEMORY).start()
    try:
        suite.load_demo_data()
        suite.probe_access(RPCS)
        suite.collect_page_tokens(RPCS)
        suite.record_memory("start")
        yield suite
    finally:
        suite.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How the process's memory went over the fuzz run."""
    if len(MEMORY) > 1:
        (_, start), (_, end) = MEMORY[0], MEMORY[-1]
        label, peak = max(MEMORY[1:], key=lambda sample: sample[1])
        terminalreporter.write_line(
            f"fuzz: VmRSS {start // 1024} MiB at the start, {end // 1024} MiB at the end, "
            f"at most {peak // 1024} MiB (after {label})"
        )
