"""What the benchmarks measure with: percentiles, a process's CPU time, the split of the
cores between the measured server and its load, and a unary load driver.

Imported by the bench scripts as `measure` (a script's own folder is on sys.path).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a whole process (all threads), from /proc; None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the ")": state is field 3, utime field 14, stime field 15 (1-based in proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(server cores, other cores) when this process may use two or more cores."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {cores[0]}, {cores[1]}


async def drive(call: Callable[[], Awaitable[Any]], calls: int, concurrency: int) -> dict[str, Any]:
    """`calls` unary calls with `concurrency` in flight: the wall time, each call's latency
    (ns) and each reply."""
    latencies: list[int] = []
    remaining = calls
    replies: list[Any] = []

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter_ns()
            reply = await call()
            latencies.append(time.perf_counter_ns() - started)
            replies.append(reply)

    wall_started = time.perf_counter_ns()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"wall_ns": time.perf_counter_ns() - wall_started, "latencies": latencies, "replies": replies}
