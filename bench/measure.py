"""What the benchmarks measure with: percentiles, a process's CPU time, the split of the
cores between the measured server and its load, and a unary load driver.

Imported by the bench scripts as `measure` (a script's own folder is on sys.path).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
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


async def alternating_rounds(
    kinds: Mapping[str, Callable[[], Awaitable[Any]]],
    *,
    calls: int,
    rounds: int,
    warmup: int,
    concurrency: int,
    server_pid: int,
    count_replies: Mapping[str, Callable[[Any], bool]] | None = None,
) -> dict[str, dict[str, Any]]:
    """Warms each kind of call up, then makes `calls` of each in `rounds` alternating rounds
    (A, B, A, B, ...), so that a drift of the machine touches every kind alike. Per kind:
    calls, seconds, calls per second, p50 and p99 latency (ms), the server's and this
    process's CPU seconds (server None where /proc is missing), and `counted`, the replies
    for which count_replies[kind] is true."""
    counters = count_replies or {}
    for call in kinds.values():  # warm-up: connection, code paths, caches
        await drive(call, warmup, concurrency)
    totals: dict[str, dict[str, Any]] = {
        kind: {"wall_ns": 0, "latencies": [], "server_cpu": 0.0, "client_cpu": 0.0, "counted": 0}
        for kind in kinds
    }
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for kind, call in kinds.items():
            server_before, client_before = process_cpu_seconds(server_pid), time.process_time()
            run = await drive(call, per_round, concurrency)
            server_after, client_after = process_cpu_seconds(server_pid), time.process_time()
            total = totals[kind]
            total["wall_ns"] += run["wall_ns"]
            total["latencies"].extend(run["latencies"])
            total["client_cpu"] += client_after - client_before
            if server_before is None or server_after is None or total["server_cpu"] is None:
                total["server_cpu"] = None
            else:
                total["server_cpu"] += server_after - server_before
            if kind in counters:
                total["counted"] += sum(1 for reply in run["replies"] if counters[kind](reply))
    summary = {}
    for kind, total in totals.items():
        latencies = sorted(total["latencies"])
        seconds = total["wall_ns"] / 1e9
        summary[kind] = {
            "calls": len(latencies),
            "seconds": seconds,
            "per_second": len(latencies) / seconds,
            "p50_ms": percentile(latencies, 0.50) / 1e6,
            "p99_ms": percentile(latencies, 0.99) / 1e6,
            "server_cpu_s": total["server_cpu"],
            "client_cpu_s": total["client_cpu"],
            "counted": total["counted"],
        }
    return summary
