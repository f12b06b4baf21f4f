"""What the benchmarks measure with: h2load sending pre-encoded gRPC calls in alternating
rounds (floor, RPC, floor, RPC, ...), proof from the server's own metrics that every call
was answered OK, the median and spread of the figures, percentiles, a process's CPU time
and the split of the cores between the measured server and everything else.

Why h2load: a load generator written in Python needs about as much CPU per call as the
server does, so on two cores it, not the server, sets the pace, and a faster floor hides
behind it. h2load (C, from nghttp2) needs a small share of its core for the same calls.
It only sees HTTP, so a gRPC error (HTTP 200 with a grpc-status trailer) would count as
served: each round is therefore checked against the server's per-RPC counts by status
code (`najimi_rpc_requests_total`, shared/metrics.py), against the bytes of reply
messages received, and with a real gRPC call of the same kind before it.

Imported by the bench scripts as `measure` (a script's own folder is on sys.path).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import struct
import subprocess
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

H2LOAD_INSTALL = (
    "install h2load, the load generator: `apt-get install -y nghttp2-client` as root on "
    "Debian/Ubuntu (`make bench` does that itself when run as root), `brew install nghttp2` on macOS"
)
# Four HTTP/2 connections with 64 streams each: 256 calls in flight, where the server's
# core is saturated. Measured on the 2-core development machine (health Check, 3 rounds
# each, the machine busy): 4-8 calls in flight gave ~3,000-3,900 calls/s with the server
# 62-80 % busy; 32 gave ~4,300-5,100 (64-77 %); 64 ~5,500-6,500 (67-96 %); 256, over 4 or
# 16 connections alike, ~5,600-7,800 with the server 94-100 % busy and h2load ~10 % of its
# core. Fewer calls in flight leave the server idle between batches of completions, which
# flatters a slower RPC; 256 stays far below the server's limit of 1,000 concurrent RPCs
# (NAJIMI_MAX_CONCURRENT_RPCS).
CONNECTIONS = 4
STREAMS_PER_CONNECTION = 64


HEALTH_PATH = "/grpc.health.v1.Health/Check"
WARMUP_SECONDS = 1.0  # per kind of call, before the rounds


class BenchFailure(RuntimeError):
    """A call was not answered OK, or the generator failed: the figures would be false."""


# Small figures -----------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values) + 0.5) - 1))
    return sorted_values[rank]


@dataclass(frozen=True)
class Spread:
    """The median of several measurements and their range."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values), len(values))

    def text(self, fmt: str = ",.0f", unit: str = "") -> str:
        return f"{self.median:{fmt}}{unit} ({self.low:{fmt}}-{self.high:{fmt}}{unit}, {self.count} rounds)"


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


def load_average() -> str:
    """The 1-minute load average against the cores: other work on the machine skews the figures."""
    try:
        one_minute = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return "load average unknown"
    cores = os.cpu_count() or 1
    note = (
        " (other processes compete for the cores: expect lower, noisier figures)" if one_minute > 0.5 else ""
    )
    return f"load average {one_minute:.2f} on {cores} cores{note}"


# gRPC on the wire --------------------------------------------------------------------------


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def rpc_counts(metrics_port: int) -> dict[tuple[str, str], dict[str, int]]:
    """The server's `najimi_rpc_requests_total`: (service, method) -> code -> calls."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    counts: dict[tuple[str, str], dict[str, int]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "najimi_rpc_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                key = (sample.labels["service"], sample.labels["method"])
                counts.setdefault(key, {})[sample.labels["code"]] = int(sample.value)
    return counts


def count_changes(
    before: dict[tuple[str, str], dict[str, int]], after: dict[tuple[str, str], dict[str, int]]
) -> dict[tuple[str, str, str], int]:
    """(service, method, code) -> calls counted between two scrapes."""
    changes = {}
    for key, codes in after.items():
        for code, count in codes.items():
            delta = count - before.get(key, {}).get(code, 0)
            if delta:
                changes[(*key, code)] = delta
    return changes


# The generator ------------------------------------------------------------------------------


def require_h2load() -> str:
    """h2load's path; raises BenchFailure saying how to install it."""
    found = shutil.which("h2load")
    if found is None:
        raise BenchFailure(f"h2load was not found on PATH: {H2LOAD_INSTALL}")
    return found


@dataclass(frozen=True)
class CallKind:
    """One kind of call the generator sends, always the same pre-encoded request.

    `counted_as` is the (service, method) under which the server counts it in its metrics
    (None for health, which the RPC interceptor does not wrap). `probe` makes one real
    gRPC call of the same kind and returns its serialized reply; it raises when the
    status or the answer is not what the bench expects. With `same_reply`, every call
    gets a reply of the probe's size, which the bytes h2load received must then show; the
    kinds whose replies vary in size (a time in them) rely on the server's counts.
    """

    name: str
    path: str
    request: bytes
    token: str | None
    counted_as: tuple[str, str] | None
    probe: Callable[[], bytes]
    same_reply: bool = True


def health_kind(channel: grpc.Channel) -> CallKind:
    """The floor: health Check of the whole server (service ""), no token."""
    request = health_pb2.HealthCheckRequest(service="")
    stub = health_pb2_grpc.HealthStub(channel)

    def probe() -> bytes:
        reply = stub.Check(request, timeout=10)
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise BenchFailure(f"health Check answered {reply.status}, not SERVING")
        return reply.SerializeToString()

    return CallKind("health", HEALTH_PATH, request.SerializeToString(), None, None, probe)


def add_generator_arguments(parser: argparse.ArgumentParser, rounds: int, round_seconds: float) -> None:
    """The command-line options of the h2load rounds, the same in every bench."""
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds per kind")
    parser.add_argument("--round-seconds", type=float, default=round_seconds, help="about, per round")
    parser.add_argument("--h2-connections", type=int, default=CONNECTIONS, help="h2load's HTTP/2 connections")
    parser.add_argument(
        "--h2-streams",
        type=int,
        default=STREAMS_PER_CONNECTION,
        help="h2load's calls in flight per connection",
    )


@dataclass
class Round:
    """One h2load run of one kind of call, every call checked as answered OK."""

    kind: str
    calls: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float | None
    generator_cpu_s: float

    @property
    def per_second(self) -> float:
        return self.calls / self.seconds


_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_DATA = re.compile(r"traffic: .*?\((\d+)\) data")


class Generator:
    """h2load pinned to the generator's cores, against one server pinned to its own."""

    def __init__(
        self,
        address: str,
        server_pid: int,
        metrics_port: int,
        cores: set[int] | None,
        workdir: Path,
        connections: int = CONNECTIONS,
        streams: int = STREAMS_PER_CONNECTION,
    ):
        self.h2load = require_h2load()
        if cores is not None and shutil.which("taskset") is None:
            raise BenchFailure("taskset (util-linux) was not found on PATH: it pins h2load to its core")
        self.address = address
        self.server_pid = server_pid
        self.metrics_port = metrics_port
        self.cores = cores
        self.connections = connections
        self.streams = streams
        self.workdir = workdir  # request bodies and h2load's per-call logs

    @classmethod
    def from_args(
        cls,
        args: argparse.Namespace,
        address: str,
        server_pid: int,
        metrics_port: int,
        cores: set[int] | None,
        workdir: Path,
    ) -> Generator:
        """A generator sized by the options of add_generator_arguments."""
        return cls(address, server_pid, metrics_port, cores, workdir, args.h2_connections, args.h2_streams)

    def describe(self) -> str:
        pin = f"pinned with taskset to CPU {sorted(self.cores)}" if self.cores else "not pinned"
        return (
            f"h2load (nghttp2, one thread, {pin}), {self.connections} HTTP/2 connections x "
            f"{self.streams} streams = {self.connections * self.streams} calls in flight, each call "
            "an HTTP/2 POST of a pre-encoded gRPC message (content-type application/grpc, te trailers, "
            "the bearer token)"
        )

    def run(self, kind: CallKind, calls: int) -> Round:
        """`calls` calls of one kind; raises BenchFailure unless every one was answered OK."""
        reply = kind.probe()  # a real call first: its status and answer are checked by the probe
        body = self.workdir / f"{kind.name}.grpc"
        body.write_bytes(grpc_frame(kind.request))
        log_file = self.workdir / f"{kind.name}.log"
        log_file.unlink(missing_ok=True)  # h2load appends to it
        command = [
            *(["taskset", "-c", ",".join(map(str, sorted(self.cores)))] if self.cores else []),
            self.h2load,
            f"--requests={calls}",
            f"--clients={self.connections}",
            f"--max-concurrent-streams={self.streams}",
            "--threads=1",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            *([f"--header=authorization: Bearer {kind.token}"] if kind.token else []),
            f"--log-file={log_file}",
            f"http://{self.address}{kind.path}",
        ]
        counts_before = rpc_counts(self.metrics_port)
        server_before = process_cpu_seconds(self.server_pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after = process_cpu_seconds(self.server_pid)
        counts_after = rpc_counts(self.metrics_port)
        if done.returncode != 0:
            raise BenchFailure(
                f"h2load exited with {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        self._check(kind, calls, done.stdout, grpc_frame(reply), count_changes(counts_before, counts_after))
        starts, ends = [], []
        latencies = []
        for line in log_file.read_text().splitlines():
            start_us, _status, elapsed_us, *_ = line.split("\t")
            starts.append(int(start_us))
            ends.append(int(start_us) + int(elapsed_us))
            latencies.append(int(elapsed_us))
        latencies.sort()
        return Round(
            kind=kind.name,
            calls=calls,
            seconds=(max(ends) - min(starts)) / 1e6,
            p50_ms=percentile(latencies, 0.50) / 1e3,
            p99_ms=percentile(latencies, 0.99) / 1e3,
            server_cpu_s=None
            if server_before is None or server_after is None
            else server_after - server_before,
            generator_cpu_s=(children_after.ru_utime + children_after.ru_stime)
            - (children_before.ru_utime + children_before.ru_stime),
        )

    def _check(
        self,
        kind: CallKind,
        calls: int,
        output: str,
        reply_frame: bytes,
        changes: dict[tuple[str, str, str], int],
    ) -> None:
        found = _REQUESTS.search(output)
        data = _DATA.search(output)
        if found is None or data is None:
            raise BenchFailure(f"cannot read h2load's summary:\n{output[-2000:]}")
        total, _, done, succeeded, failed, errored, timeout = map(int, found.groups())
        if not total == done == succeeded == calls or failed or errored or timeout:
            raise BenchFailure(f"{kind.name}: h2load did not get {calls} HTTP 200 answers:\n{output[-2000:]}")
        # Every answer carried one reply message (an error is trailers only, with no message).
        received = int(data.group(1))
        if kind.same_reply and received != calls * len(reply_frame):
            raise BenchFailure(
                f"{kind.name}: {received} bytes of reply messages for {calls} calls, expected "
                f"{calls} x {len(reply_frame)} (the probe's reply): some calls were not answered OK"
            )
        errors = {key: n for key, n in changes.items() if key[2] != "OK"}
        if errors:
            raise BenchFailure(
                f"{kind.name}: the server answered calls with errors during the round: {errors}"
            )
        if kind.counted_as is None and not kind.same_reply:
            raise BenchFailure(f"{kind.name}: neither counted by the server nor of a known reply size")
        if kind.counted_as is not None:
            ok = changes.get((*kind.counted_as, "OK"), 0)
            if ok != calls:
                raise BenchFailure(
                    f"{kind.name}: the server counted {ok} OK {kind.counted_as[1]} calls, h2load {calls}"
                )

    def alternating_rounds(
        self,
        kinds: Sequence[CallKind],
        rounds: int,
        round_seconds: float,
        warmup_seconds: float = WARMUP_SECONDS,
    ) -> dict[str, list[Round]]:
        """Warms each kind up, sizes its rounds from the warm-up's rate to last about
        `round_seconds`, then runs `rounds` rounds of each kind in turn (A, B, A, B, ...),
        so that a drift of the machine touches every kind alike."""
        sizes = {}
        for kind in kinds:
            first = self.run(kind, 256)
            warm = self.run(kind, max(256, round(first.per_second * warmup_seconds)))
            sizes[kind.name] = max(256, round(warm.per_second * round_seconds))
        measured: dict[str, list[Round]] = {kind.name: [] for kind in kinds}
        for _ in range(rounds):
            for kind in kinds:
                measured[kind.name].append(self.run(kind, sizes[kind.name]))
        return measured


def ratios(rounds: dict[str, list[Round]], kind: str, floor: str) -> list[float]:
    """Per round, `kind`'s calls per second over the floor's in the same round."""
    return [mine.per_second / base.per_second for mine, base in zip(rounds[kind], rounds[floor], strict=True)]


def _cpu_per_call(one: Round) -> float:
    return (one.server_cpu_s or float("nan")) / one.calls


def round_lines(rounds: list[Round], floor: list[Round] | None) -> str:
    """A kind's figures over its rounds: calls/s, the share of the floor, latency and CPU."""
    rates = Spread.of([r.per_second for r in rounds])
    parts = [f"{rates.text()} calls/s"]
    if floor is not None:
        share = Spread.of([100 * r.per_second / f.per_second for r, f in zip(rounds, floor, strict=True)])
        parts.append(f"= {share.text('.1f', ' %')} of the floor")
    p50 = statistics.median(r.p50_ms for r in rounds)
    p99 = statistics.median(r.p99_ms for r in rounds)
    parts.append(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms (medians)")
    if all(r.server_cpu_s is not None for r in rounds):
        busy = statistics.median(r.server_cpu_s / r.seconds for r in rounds)  # type: ignore[operator]
        cost = statistics.median(1e6 * r.server_cpu_s / r.calls for r in rounds)  # type: ignore[operator]
        parts.append(f"server {100 * busy:.0f} % of its core, {cost:.0f} µs CPU/call")
        if floor is not None:  # the floor's CPU per call over this kind's: less swayed by a busy machine
            by_cpu = Spread.of(
                [_cpu_per_call(f) / _cpu_per_call(r) for r, f in zip(rounds, floor, strict=True)]
            )
            parts.append(f"by server CPU per call {100 * by_cpu.median:.1f} % of the floor's")
    parts.append(
        f"h2load {100 * statistics.median(r.generator_cpu_s / r.seconds for r in rounds):.0f} % of its core"
    )
    return "; ".join(parts)


def describe_rounds(rounds: dict[str, list[Round]], round_seconds: float) -> str:
    first = next(iter(rounds.values()))
    return (
        f"{len(first)} alternating rounds of about {round_seconds:.0f} s per kind ("
        + ", ".join(f"{name} {kind_rounds[0].calls:,} calls" for name, kind_rounds in rounds.items())
        + " each), after a warm-up; every call answered OK (h2load's 200s, the reply bytes, the server's "
        "per-RPC counts by code, a real gRPC call before each round)"
    )
