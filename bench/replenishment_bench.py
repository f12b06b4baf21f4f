"""Replenishment benchmark: telemetry from 1,000 simulated devices beside the gRPC floor,
Replenish latency, duplicate orders after a retry storm, and the forecast's accuracy.

Run by `make bench` as `.venv/bin/python bench/replenishment_bench.py`. It starts a real
consent service and a real replenishment service (port 0, SQLite in a temporary data
directory; the replenishment service pinned to one core, everything else to the other),
registers 1,000 devices with one AUTO slot each through RegisterDevice (as
service:storefront, services/replenishment/simulator.py), grants their customers
`replenishment.automatic_ordering`, waits until the replenishment service's consent cache
has the last grant, and prints, in alternating rounds, the median and the range:

1. Sustained ReportTelemetry readings/s from the 1,000 devices, each call with its own
   device's token and fresh readings (new reading_ids, the current time, an idle device's
   steady level), one reading a call (a device reporting each reading as it takes it) and
   ten (a device sending what it buffered): each is ACCEPTED only once committed (durable,
   acknowledged), beside the health Check floor from h2load (bench/measure.py) in the same
   rounds, as a ratio. Target: at least 70 % of the floor.
   Why not h2load for the telemetry too: h2load sends one request body and one set of
   headers for every call. A ReportTelemetry body sent again is a DUPLICATE reading (not
   stored again: it would measure the idempotency lookup, not a durable write), and one
   token would be one device, which the per-device rate limit stops. So the telemetry
   comes from a separate load client process (grpc.aio, pre-encoded request bytes: the
   stubs' serializer is bypassed, a request costs the client about a microsecond to
   build), 256 calls in flight as h2load keeps, cycling over the 1,000 devices' tokens and
   sending each device's readings in order. The same client also measures its own
   ceiling (health Check as fast as it can) so the figure shows whether it, rather than
   the server, set the pace; the server's CPU per call is printed beside it.
   In the same rounds, StreamTelemetry (a chatty device) from h2load: one h2load request is
   one stream of STREAM_MESSAGES gRPC-framed messages of one reading each for one device,
   with its token; one h2load process per stream (STREAM_CALLS a round, each a different
   device), for the reason above; every reading is counted in the database afterwards.
   h2load sends a stream's messages at once, ahead of the answers (a device catching up,
   or one that does not wait for each answer): the server stores the messages waiting
   together and decides their slot once (device_api.StreamTelemetry). A device that waits
   for each answer before the next message gets groups of one: what every message cost
   before the grouping (0.55-0.58 ms of server CPU a reading, 57-61 % of the floor).
2. Replenish p50/p99: a device asking to re-order its slot (a fresh request_id each, 16
   in flight over 200 devices): the first call of a slot places an order, the next ones
   find it in progress (the decision path: open order, consent, limits).
3. Duplicate orders after a retry storm, per round 20 fresh slots: 50 concurrent clients
   send Replenish (a third of them retries of an earlier request_id) and ReportTelemetry
   with low levels for those slots for a few seconds; then ListOrders (admin) counts the
   slots' orders. A slot may have one; every further one is a duplicate. Must be 0.
4. The forecast accuracy section of bench/replenishment_forecast_bench.py
   (`run_forecast_accuracy`), when present.

The targets are informational: the exit code is 0 unless something crashed.
Options: --no-pin, --devices, --rounds, --round-seconds, --in-flight, --storm-seconds,
--readings-per-call, --stream-calls, --stream-messages, --telemetry-only.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import random
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from measure import (
    BenchFailure,
    Generator,
    Spread,
    count_changes,
    cpu_split,
    grpc_frame,
    health_kind,
    load_average,
    percentile,
    process_cpu_seconds,
    rpc_counts,
)
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc
from profile_bench import explain, in_parallel, pinned, start_service, varint, verdict

from services.replenishment.simulator import DeviceBook, register_devices, simulated_specs
from shared.dev_tokens import ensure_dev_tokens
from tests.postgres import free_port

DEVICES = 1_000
ROUNDS = 5
ROUND_SECONDS = 4.0
WARMUP_SECONDS = 1.0
IN_FLIGHT = 256  # as h2load keeps (bench/measure.py)
READINGS_PER_CALL = (1, 10)
REPLENISH_DEVICES = 200
REPLENISH_IN_FLIGHT = 16
STORM_SLOTS = 20
STORM_CLIENTS = 50
STORM_SECONDS = 3.0
TARGET_TELEMETRY_SHARE = 70.0
AUTOMATIC_ORDERING = "replenishment.automatic_ordering"
CONSENT_WAIT_SECONDS = 60.0

DEVICE_SERVICE = "/najimi.replenishment.device.v1.DeviceService"
REPORT_PATH = f"{DEVICE_SERVICE}/ReportTelemetry"
STREAM_PATH = f"{DEVICE_SERVICE}/StreamTelemetry"
STREAM_MESSAGES = 100  # per StreamTelemetry stream (one reading a message): a chatty device
STREAM_CALLS = 256  # streams a round, one device each, all started at once (256 in flight, as h2load keeps)
REPLENISH_PATH = f"{DEVICE_SERVICE}/Replenish"
HEALTH_PATH = "/grpc.health.v1.Health/Check"


# Requests, encoded fast -----------------------------------------------------------------------


def _string(field: int, value: str) -> bytes:
    data = value.encode()
    return bytes([field << 3 | 2]) + varint(len(data)) + data


def reading_bytes(slot_id: str, reading_id: str, level: float, measure_us: int) -> bytes:
    """Reading{reading_id, slot_id, level, measure_time}."""
    seconds, micros = divmod(measure_us, 1_000_000)
    timestamp = b"\x08" + varint(seconds) + b"\x10" + varint(micros * 1000)
    return (
        _string(1, reading_id)
        + _string(2, slot_id)
        + b"\x19"
        + struct.pack("<d", level)
        + b"\x22"
        + varint(len(timestamp))
        + timestamp
    )


def report_bytes(
    device_id: str, slot_id: str, reading_id: str, level: float, now_us: int, count: int = 1
) -> bytes:
    """ReportTelemetryRequest{device_id, readings}: `count` readings a millisecond apart,
    ending now, their ids `reading_id` or `reading_id.k`."""
    parts = [_string(1, device_id)]
    for k in range(count):
        reading = reading_bytes(
            slot_id, reading_id if count == 1 else f"{reading_id}.{k}", level, now_us - (count - 1 - k) * 1000
        )
        parts.append(b"\x12" + varint(len(reading)) + reading)
    return b"".join(parts)


def replenish_bytes(request_id: str, device_id: str, slot_id: str) -> bytes:
    return _string(1, request_id) + _string(2, device_id) + _string(3, slot_id)


# The load client (a separate process) ---------------------------------------------------------


async def client_telemetry(
    channel: grpc.aio.Channel, args: Any, devices: list[dict[str, str]]
) -> dict[str, Any]:
    call = channel.unary_unary(
        REPORT_PATH,
        request_serializer=None,
        response_deserializer=device_pb.ReportTelemetryResponse.FromString,
    )
    cursor = iter(range(10**12))
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    start = time.perf_counter() + args.warmup_seconds
    end = start + args.seconds
    busy = {d["device_id"]: asyncio.Lock() for d in devices}  # a device's readings in order

    async def worker() -> None:
        while time.perf_counter() < end:
            n = next(cursor)
            device = devices[n % len(devices)]
            async with busy[device["device_id"]]:
                payload = report_bytes(
                    device["device_id"],
                    device["slot_id"],
                    f"{args.prefix}-{n}",
                    90.0,
                    time.time_ns() // 1000,
                    args.readings_per_call,
                )
                sent = time.perf_counter()
                reply = await call(payload, metadata=device["metadata"], timeout=30)
                replied = time.perf_counter()
            if start <= replied <= end:
                latencies.append(replied - sent)
                for result in reply.results:
                    statuses[device_pb.ReadingStatus.Name(result.status)] += 1

    cpu_before = time.process_time()
    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    latencies.sort()
    acknowledged = statuses["READING_STATUS_ACCEPTED"] + statuses["READING_STATUS_DUPLICATE"]
    return {
        "per_second": acknowledged / args.seconds,
        "statuses": dict(statuses),
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "client_cpu_share": (time.process_time() - cpu_before) / (args.seconds + args.warmup_seconds),
    }


async def client_health(channel: grpc.aio.Channel, args: Any) -> dict[str, Any]:
    """The client's own ceiling: health Check (empty request) as fast as it can."""
    call = channel.unary_unary(HEALTH_PATH, request_serializer=None, response_deserializer=None)
    start = time.perf_counter() + args.warmup_seconds
    end = start + args.seconds
    counted = 0

    async def worker() -> None:
        nonlocal counted
        while time.perf_counter() < end:
            await call(b"", timeout=30)
            counted += start <= time.perf_counter() <= end

    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    return {"per_second": counted / args.seconds}


async def client_replenish(
    channel: grpc.aio.Channel, args: Any, devices: list[dict[str, str]]
) -> dict[str, Any]:
    call = channel.unary_unary(
        REPLENISH_PATH, request_serializer=None, response_deserializer=device_pb.ReplenishResponse.FromString
    )
    cursor = iter(range(10**12))
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    end = time.perf_counter() + args.seconds

    async def worker() -> None:
        while time.perf_counter() < end:
            n = next(cursor)
            device = devices[n % len(devices)]
            payload = replenish_bytes(f"{args.prefix}-{n}", device["device_id"], device["slot_id"])
            sent = time.perf_counter()
            reply = await call(payload, metadata=device["metadata"], timeout=30)
            latencies.append(time.perf_counter() - sent)
            outcomes[device_pb.ReplenishOutcome.Name(reply.outcome.outcome)] += 1

    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    latencies.sort()
    return {
        "calls": len(latencies),
        "outcomes": dict(outcomes),
        "p50_ms": percentile(latencies, 0.5) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
    }


async def client_storm(address: str, args: Any, devices: list[dict[str, str]]) -> dict[str, Any]:
    """STORM_CLIENTS clients (each its own channel) hammer the devices' slots with Replenish
    (a third retries) and low readings; errors other than UNAVAILABLE are counted."""
    rng = random.Random(args.prefix)
    end = time.perf_counter() + args.seconds
    sent: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()

    async def client(index: int) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            replenish = channel.unary_unary(
                REPLENISH_PATH, request_serializer=None, response_deserializer=None
            )
            report = channel.unary_unary(REPORT_PATH, request_serializer=None, response_deserializer=None)
            used: list[str] = []
            n = 0
            while time.perf_counter() < end:
                n += 1
                device = devices[rng.randrange(len(devices))]
                try:
                    if rng.random() < 0.5:
                        retry = used and rng.random() < 1 / 3
                        request_id = rng.choice(used) if retry else f"{args.prefix}-{index}-{n}"
                        if not retry:
                            used.append(request_id)
                        # A retried id is sent for the device it was first sent for.
                        target = (
                            devices[int(request_id.rsplit("-", 1)[1]) % len(devices)] if retry else device
                        )
                        reply = await replenish(
                            replenish_bytes(request_id, target["device_id"], target["slot_id"]),
                            metadata=target["metadata"],
                            timeout=30,
                        )
                        sent["replenish_retry" if retry else "replenish"] += 1
                        outcome = device_pb.ReplenishResponse.FromString(reply).outcome.outcome
                        outcomes[
                            device_pb.ReplenishOutcome.Name(outcome).removeprefix("REPLENISH_OUTCOME_")
                        ] += 1
                    else:
                        payload = report_bytes(
                            device["device_id"],
                            device["slot_id"],
                            f"{args.prefix}-r{index}-{n}",
                            rng.uniform(1.0, 10.0),
                            time.time_ns() // 1000,
                        )
                        await report(payload, metadata=device["metadata"], timeout=30)
                        sent["report"] += 1
                except grpc.aio.AioRpcError as error:
                    errors[error.code().name] += 1

    await asyncio.gather(*(client(i) for i in range(STORM_CLIENTS)))
    return {"sent": dict(sent), "errors": dict(errors), "outcomes": dict(outcomes)}


async def client_main(args: argparse.Namespace, devices: list[dict[str, Any]]) -> dict[str, Any]:
    for device in devices:
        device["metadata"] = (("authorization", f"Bearer {device['token']}"),)
    if args.mode == "storm":
        return await client_storm(args.address, args, devices)
    async with grpc.aio.insecure_channel(args.address) as channel:
        if args.mode == "telemetry":
            return await client_telemetry(channel, args, devices)
        if args.mode == "replenish":
            return await client_replenish(channel, args, devices)
        return await client_health(channel, args)


def run_client(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--mode", choices=("telemetry", "health", "replenish", "storm"), required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--devices-json", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup-seconds", type=float, default=WARMUP_SECONDS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--readings-per-call", type=int, default=1)
    parser.add_argument("--cpus", default="")
    args = parser.parse_args(argv)
    if args.cpus:
        import os

        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    devices = json.loads(Path(args.devices_json).read_text())
    print(json.dumps(asyncio.run(client_main(args, devices))))


def client(
    args: argparse.Namespace, mode: str, address: str, devices_json: Path, seconds: float, **extra: Any
) -> Any:
    """Runs the load client process once and returns its JSON answer."""
    command = [
        sys.executable,
        __file__,
        "--client",
        f"--mode={mode}",
        f"--address={address}",
        f"--devices-json={devices_json}",
        f"--prefix={mode}-{uuid.uuid4().hex[:8]}",
        f"--seconds={seconds}",
        *(f"--{key.replace('_', '-')}={value}" for key, value in extra.items()),
        *([f"--cpus={','.join(map(str, sorted(args.client_cores)))}"] if args.client_cores else []),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise BenchFailure(f"the load client ({mode}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# The bench (this process) -----------------------------------------------------------------------


async def grant_all(address: str, token: str, customers: list[str]) -> float:
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)

        def grant(customer: str) -> Any:
            request = consent_pb.GrantConsentRequest(
                customer_id=customer,
                purpose=AUTOMATIC_ORDERING,
                data_categories=["user.device.telemetry", "user.behavior.purchase_history"],
                notice_version=1,
                collection_method=consent_pb.COLLECTION_METHOD_DEVICE,
                jurisdiction="JP",
                request_id=f"bench-grant-{customer}",
            )
            return lambda: stub.GrantConsent(request, metadata=metadata, timeout=30)

        return await in_parallel([grant(c) for c in customers], 8)


async def wait_for_consent(channel: grpc.aio.Channel, device: dict[str, Any]) -> str:
    """Asks Replenish for the probe device until the answer is not CONSENT_REQUIRED (the
    consent feed is ordered: the cache then has every grant). "" or why not."""
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    stub = device_grpc.DeviceServiceStub(channel)
    metadata = (("authorization", f"Bearer {device['token']}"),)
    deadline = time.monotonic() + CONSENT_WAIT_SECONDS
    while True:
        request = device_pb.ReplenishRequest(
            request_id=f"probe-{uuid.uuid4().hex[:12]}",
            device_id=device["device_id"],
            slot_id=device["slot_id"],
        )
        try:
            reply = await stub.Replenish(request, metadata=metadata, timeout=30)
            if reply.outcome.outcome != device_pb.REPLENISH_OUTCOME_CONSENT_REQUIRED:
                return ""
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "Replenish is not implemented yet (UNIMPLEMENTED)"
            if error.code() != grpc.StatusCode.UNAVAILABLE:  # UNAVAILABLE: consent state stale
                raise
        if time.monotonic() > deadline:
            return f"the consent cache did not see the grants within {CONSENT_WAIT_SECONDS:.0f} s"
        await asyncio.sleep(0.2)


def probe_telemetry(address: str, device: dict[str, Any]) -> str:
    """One real ReportTelemetry call: "" when its reading is ACCEPTED, else why not."""
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    request = device_pb.ReportTelemetryRequest.FromString(
        report_bytes(
            device["device_id"],
            device["slot_id"],
            f"probe-{uuid.uuid4().hex[:12]}",
            90.0,
            time.time_ns() // 1000,
        )
    )
    with grpc.insecure_channel(address) as channel:
        try:
            reply = device_grpc.DeviceServiceStub(channel).ReportTelemetry(
                request, metadata=(("authorization", f"Bearer {device['token']}"),), timeout=30
            )
        except grpc.RpcError as error:
            return f"ReportTelemetry answered {error.code().name}: {error.details()}"
    if [r.status for r in reply.results] != [device_pb.READING_STATUS_ACCEPTED]:
        raise BenchFailure(f"the probe reading was not ACCEPTED: {reply}")
    return ""


def run_queue_seconds(pid: int) -> float | None:
    """Seconds the process's threads have spent runnable but waiting for a CPU (the second
    field of /proc/<pid>/task/*/schedstat, in ns); None where /proc does not have it."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended meanwhile
    return total / 1e9


@dataclass
class TelemetryFigures:
    """One batch size's rounds: readings/s, share of the same round's floor, costs."""

    readings_per_call: int
    per_second: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    cpu_per_reading_us: list[float] = field(default_factory=list)
    client_share: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    # Seconds the server's threads sat runnable without a CPU, per second of the round: high
    # when other processes took the server's core (the rounds where it "answered nothing").
    cpu_wait: list[float] = field(default_factory=list)


def telemetry_round(
    args: argparse.Namespace,
    server: Any,
    metrics_port: int,
    devices_json: Path,
    figures: TelemetryFigures,
    floor: float,
) -> None:
    counts_before = rpc_counts(metrics_port)
    cpu_before = process_cpu_seconds(server.process.pid)
    wait_before, started = run_queue_seconds(server.process.pid), time.monotonic()
    result = client(
        args,
        "telemetry",
        server.address,
        devices_json,
        args.round_seconds,
        in_flight=args.in_flight,
        readings_per_call=figures.readings_per_call,
    )
    cpu_after = process_cpu_seconds(server.process.pid)
    wait_after = run_queue_seconds(server.process.pid)
    if wait_before is not None and wait_after is not None:
        figures.cpu_wait.append(max(0.0, wait_after - wait_before) / (time.monotonic() - started))
    changes = count_changes(counts_before, rpc_counts(metrics_port))
    errors = {k: n for k, n in changes.items() if k[2] != "OK"}
    if errors:
        raise BenchFailure(f"telemetry: the server answered calls with errors: {errors}")
    rejected = {s: n for s, n in result["statuses"].items() if s != "READING_STATUS_ACCEPTED"}
    if rejected:
        raise BenchFailure(f"telemetry: readings not ACCEPTED: {rejected}")
    figures.per_second.append(result["per_second"])
    figures.shares.append(100 * result["per_second"] / floor)
    figures.client_share.append(100 * result["client_cpu_share"])
    figures.p50_ms.append(result["p50_ms"])
    figures.p99_ms.append(result["p99_ms"])
    calls = changes.get(("replenishment", "ReportTelemetry", "OK"), 0)
    if cpu_before is not None and cpu_after is not None and calls:
        figures.cpu_per_reading_us.append(
            1e6 * (cpu_after - cpu_before) / (calls * figures.readings_per_call)
        )


def stream_body(device: dict[str, Any], prefix: str, messages: int, now_us: int) -> bytes:
    """One StreamTelemetry call's request body: `messages` gRPC-framed messages of one
    reading each for one device (each naming it), a millisecond apart and ending now."""
    return b"".join(
        grpc_frame(
            report_bytes(
                device["device_id"],
                device["slot_id"],
                f"{prefix}-{k}",
                90.0,
                now_us - (messages - 1 - k) * 1000,
            )
        )
        for k in range(messages)
    )


def stored_readings(data_dir: Path) -> int:
    """Readings committed in the replenishment service's SQLite database (read-only)."""
    database = sqlite3.connect(f"file:{data_dir / 'replenishment.db'}?mode=ro", uri=True, timeout=30)
    try:
        return int(database.execute("SELECT COUNT(*) FROM readings").fetchone()[0])
    finally:
        database.close()


@dataclass
class StreamRounds:
    """StreamTelemetry from h2load: one h2load process per stream, since h2load sends one body
    and one token for every call (the module docstring), and a body sent again would be
    DUPLICATE readings and one token one device."""

    h2load: str
    devices: list[dict[str, Any]]
    data_dir: Path
    next_device: int = 0
    figures: TelemetryFigures = field(default_factory=lambda: TelemetryFigures(1))

    def run(self, args: argparse.Namespace, server: Any, metrics_port: int, floor: float) -> None:
        calls, messages = args.stream_calls, args.stream_messages
        now_us = time.time_ns() // 1000
        commands = []
        for n in range(calls):
            device = self.devices[self.next_device % len(self.devices)]
            self.next_device += 1
            body = self.data_dir / f"stream-{n}.grpc"
            log_file = self.data_dir / f"stream-{n}.log"
            log_file.unlink(missing_ok=True)  # h2load appends to it
            body.write_bytes(
                stream_body(device, f"s{self.next_device}-{uuid.uuid4().hex[:6]}", messages, now_us)
            )
            commands.append(
                [
                    *(
                        ["taskset", "-c", ",".join(map(str, sorted(args.client_cores)))]
                        if args.client_cores
                        else []
                    ),
                    self.h2load,
                    "--requests=1",
                    "--clients=1",
                    "--threads=1",
                    f"--data={body}",
                    "--header=content-type: application/grpc",
                    "--header=te: trailers",
                    f"--header=authorization: Bearer {device['token']}",
                    f"--log-file={log_file}",
                    f"http://{server.address}{STREAM_PATH}",
                ]
            )
        counts_before = rpc_counts(metrics_port)
        stored_before = stored_readings(self.data_dir)
        cpu_before = process_cpu_seconds(server.process.pid)
        wait_before, started = run_queue_seconds(server.process.pid), time.monotonic()
        running = [
            subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands
        ]
        outputs = [process.communicate(timeout=600)[0] for process in running]
        cpu_after = process_cpu_seconds(server.process.pid)
        wait_after, elapsed = run_queue_seconds(server.process.pid), time.monotonic() - started
        # The window from the first stream's start to the last one's end (h2load's logs, µs since
        # the epoch), without the time the processes took to start before it.
        spans = [
            (int(start), int(start) + int(took))
            for n in range(calls)
            for start, _status, took, *_ in [(self.data_dir / f"stream-{n}.log").read_text().split("\t")]
        ]
        seconds = (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e6
        changes = count_changes(counts_before, rpc_counts(metrics_port))
        stored = stored_readings(self.data_dir) - stored_before
        failed = [
            o for p, o in zip(running, outputs, strict=True) if p.returncode != 0 or "1 succeeded" not in o
        ]
        if failed:
            raise BenchFailure(f"StreamTelemetry: {len(failed)} h2load runs failed:\n{failed[0][-2000:]}")
        errors = {k: n for k, n in changes.items() if k[2] != "OK"}
        ok = changes.get(("replenishment", "StreamTelemetry", "OK"), 0)
        if errors or ok != calls:
            raise BenchFailure(f"StreamTelemetry: {ok} streams OK of {calls}, errors {errors}")
        # Durable: every reading of every stream is in the database (none DUPLICATE or REJECTED).
        if stored != calls * messages:
            raise BenchFailure(f"StreamTelemetry: {stored} readings stored, {calls * messages} sent")
        figures = self.figures
        if wait_before is not None and wait_after is not None:
            figures.cpu_wait.append(max(0.0, wait_after - wait_before) / elapsed)
        figures.per_second.append(stored / seconds)
        figures.shares.append(100 * stored / seconds / floor)
        if cpu_before is not None and cpu_after is not None:
            figures.cpu_per_reading_us.append(1e6 * (cpu_after - cpu_before) / stored)


def telemetry_rounds(
    args: argparse.Namespace, server: Any, metrics_port: int, devices_json: Path, workdir: Path
) -> None:
    devices = len(json.loads(devices_json.read_text()))
    print(f"\n1. Sustained ReportTelemetry from {devices:,} devices, beside the health Check floor")
    explain(
        f"in each of {args.rounds} alternating rounds: h2load's health Check floor (bench/measure.py, "
        f"256 calls in flight, sized to about {args.round_seconds:.0f} s), then for each batch size the load "
        f"client's ReportTelemetry for {args.round_seconds:.0f} s after {WARMUP_SECONDS:.0f} s of warm-up: "
        f"{args.in_flight} calls in flight, each call one device's fresh readings (1 per call: a device "
        "reporting each reading as it takes it; 10: a device sending what it buffered) with that device's "
        "token, cycling over the devices, a device's calls one at a time; readings/s = ACCEPTED results "
        "received in the window / the window. The server's per-RPC counts by code are checked: every "
        "ReportTelemetry answered OK. Why not h2load: the module docstring (one body, one token for every call). "
        "'server waited ... for a CPU': seconds its threads sat runnable without a CPU per second of the round "
        "(/proc schedstat); about 1 s/s is its own threads (event loop, gRPC poller, database writer) taking "
        "turns on its one core; several s/s means other processes had that core, and the round says little."
    )
    why = probe_telemetry(server.address, json.loads(devices_json.read_text())[0])
    if why:
        print(f"   not measured: {why}")
        return
    with grpc.insecure_channel(server.address) as channel:
        floor_kind = health_kind(channel)
        generator = Generator(server.address, server.process.pid, metrics_port, args.client_cores, workdir)
        first = generator.run(floor_kind, 256)
        warm = generator.run(floor_kind, max(256, round(first.per_second)))
        size = max(256, round(warm.per_second * args.round_seconds))
        floors, floor_cpu = [], []
        batches = [TelemetryFigures(n) for n in args.readings_per_call]
        streams = (
            StreamRounds(generator.h2load, json.loads(devices_json.read_text()), workdir)
            if args.stream_calls
            else None
        )
        for _ in range(args.rounds):
            floor = generator.run(floor_kind, size)
            floors.append(floor.per_second)
            if floor.server_cpu_s is not None:
                floor_cpu.append(1e6 * floor.server_cpu_s / floor.calls)
            line = f"   round: floor {floor.per_second:,.0f} calls/s"
            for figures in batches:
                telemetry_round(args, server, metrics_port, devices_json, figures, floor.per_second)
                line += (
                    f"; {figures.readings_per_call}/call {figures.per_second[-1]:,.0f} readings/s "
                    f"({figures.shares[-1]:.1f} %)"
                    + (
                        f", server waited {figures.cpu_wait[-1]:.2f} s/s for a CPU"
                        if figures.cpu_wait
                        else ""
                    )
                )
            if streams is not None:
                streams.run(args, server, metrics_port, floor.per_second)
                line += f"; stream {streams.figures.per_second[-1]:,.0f} readings/s ({streams.figures.shares[-1]:.1f} %)"
                if streams.figures.cpu_wait:
                    line += f", server waited {streams.figures.cpu_wait[-1]:.2f} s/s"
            print(line)
        ceiling = client(
            args, "health", server.address, devices_json, args.round_seconds, in_flight=args.in_flight
        )
    cpu = f"; server CPU {Spread.of(floor_cpu).text('.0f', ' µs')} per call" if floor_cpu else ""
    print(f"   health Check floor (h2load): {Spread.of(floors).text()} calls/s{cpu}")
    for figures in batches:
        share = Spread.of(figures.shares)
        print(
            f"   ReportTelemetry, {figures.readings_per_call} reading(s) a call: "
            f"{Spread.of(figures.per_second).text()} readings/s, durable and acknowledged\n"
            f"      = {share.text('.1f', ' %')} of the floor — target ≥ {TARGET_TELEMETRY_SHARE:.0f} %: "
            f"{verdict(share.median >= TARGET_TELEMETRY_SHARE)}\n"
            f"      call latency p50 {statistics.median(figures.p50_ms):.1f} ms, p99 "
            f"{statistics.median(figures.p99_ms):.1f} ms (medians); "
            + (
                f"server CPU {Spread.of(figures.cpu_per_reading_us).text('.0f', ' µs')} per reading; "
                if figures.cpu_per_reading_us
                else ""
            )
            + f"load client {Spread.of(figures.client_share).text('.0f', ' %')} of its core"
        )
    if streams is not None:
        share = Spread.of(streams.figures.shares)
        print(
            f"   StreamTelemetry, 1 reading a message, {args.stream_messages} messages a stream sent ahead, "
            f"{args.stream_calls} streams (devices) a round all in flight, one h2load process each: "
            f"{Spread.of(streams.figures.per_second).text()} readings/s, each stored (counted in the database)\n"
            f"      = {share.text('.1f', ' %')} of the floor — target ≥ {TARGET_TELEMETRY_SHARE:.0f} %: "
            f"{verdict(share.median >= TARGET_TELEMETRY_SHARE)}; "
            + (
                f"server CPU {Spread.of(streams.figures.cpu_per_reading_us).text('.0f', ' µs')} per reading"
                if streams.figures.cpu_per_reading_us
                else ""
            )
        )
    print(
        f"   the load client's own ceiling (health Check from the same client): {ceiling['per_second']:,.0f} "
        "calls/s: telemetry calls well below it were paced by the server"
    )


def replenish_rounds(args: argparse.Namespace, server: Any, devices_json: Path) -> None:
    print("\n2. Replenish latency")
    explain(
        f"the load client sends Replenish for {REPLENISH_DEVICES} devices' slots (a fresh request_id each, "
        f"{REPLENISH_IN_FLIGHT} in flight) for {args.round_seconds:.0f} s per round; latency per call, client "
        "side. The first call of a slot places an order (PENDING), later ones find it in progress."
    )
    p50s, p99s, outcomes = [], [], Counter()
    for _ in range(args.rounds):
        result = client(
            args, "replenish", server.address, devices_json, args.round_seconds, in_flight=REPLENISH_IN_FLIGHT
        )
        p50s.append(result["p50_ms"])
        p99s.append(result["p99_ms"])
        outcomes.update(result["outcomes"])
    print(f"   p50 {Spread.of(p50s).text('.2f', ' ms')}; p99 {Spread.of(p99s).text('.2f', ' ms')}")
    print(f"   outcomes: {dict(outcomes)}")


async def count_orders(address: str, admin: str, device_ids: list[str]) -> dict[str, int]:
    metadata = (("authorization", f"Bearer {admin}"),)
    counts: dict[str, int] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ReplenishmentServiceStub(channel)
        for device_id in device_ids:
            reply = await stub.ListOrders(
                pb.ListOrdersRequest(device_id=device_id, page_size=1000), metadata=metadata, timeout=30
            )
            counts[device_id] = sum(1 for o in reply.orders if o.state != pb.ORDER_STATE_CANCELLED)
    return counts


def storm_rounds(
    args: argparse.Namespace, server: Any, devices: list[dict[str, Any]], admin: str, workdir: Path
) -> None:
    print("\n3. Duplicate orders after a retry storm")
    explain(
        f"per round {STORM_SLOTS} fresh slots; {STORM_CLIENTS} clients (a channel each) send Replenish (a "
        f"third retries of an earlier request_id) and ReportTelemetry with low levels for {args.storm_seconds:.0f} s; "
        "then ListOrders (admin) per device. A slot may have one order (no delivery happens in the storm); "
        "each further non-cancelled one is a duplicate."
    )
    duplicates, with_order, sent = [], [], Counter()
    for index in range(args.rounds):
        chosen = devices[
            len(devices) - 1 - (index + 1) * STORM_SLOTS : len(devices) - 1 - index * STORM_SLOTS
        ]
        path = workdir / f"storm-{index}.json"
        path.write_text(json.dumps(chosen))
        result = client(args, "storm", server.address, path, args.storm_seconds)
        sent.update(result["sent"])
        counts = asyncio.run(count_orders(server.address, admin, [d["device_id"] for d in chosen]))
        duplicates.append(sum(max(0, n - 1) for n in counts.values()))
        with_order.append(sum(1 for n in counts.values() if n))
        if result["errors"] or with_order[-1] < len(chosen):
            print(f"   round {index + 1}: Replenish outcomes {result['outcomes']}, errors {result['errors']}")
    total = sum(duplicates)
    print(f"   sent: {dict(sent)}")
    print(f"   slots with an order: {with_order} of {STORM_SLOTS} per round")
    print(f"   duplicate orders: {total} over {args.rounds} rounds — must be 0: {verdict(total == 0)}")


def _log_entry(line: str) -> dict[str, Any]:
    try:
        entry = json.loads(line)
    except ValueError:
        return {}
    return entry if isinstance(entry, dict) else {}


def forecast_accuracy() -> None:
    print("\n4. Forecast accuracy (bench/replenishment_forecast_bench.py)")
    try:
        module = importlib.import_module("replenishment_forecast_bench")
    except ImportError as error:
        print(f"   not measured: {error}")
        return
    run = getattr(module, "run_forecast_accuracy", None)
    if run is None:
        print("   not measured: replenishment_forecast_bench has no run_forecast_accuracy")
        return
    figures = run()
    try:
        print(
            f"   run-out error in days (|predicted - true|, {int(figures['runout_points'])} points): forecast "
            f"median {figures['runout_median_abs_days_forecast']:.2f}, p90 {figures['runout_p90_abs_days_forecast']:.2f}; "
            f"naive last-two-readings median {figures['runout_median_abs_days_naive']:.2f}, p90 "
            f"{figures['runout_p90_abs_days_naive']:.2f} (ratio {figures['runout_median_ratio']:.2f}x, "
            f"{figures['runout_p90_ratio']:.2f}x)"
        )
        for key in sorted(
            k.removeprefix("orders_per_device_year_") for k in figures if k.startswith("orders_per_")
        ):
            print(
                f"   a simulated year, policy {key}: {figures[f'orders_per_device_year_{key}']:.2f} orders, "
                f"{figures[f'stockouts_per_device_year_{key}']:.2f} stock-outs, "
                f"{figures[f'empty_days_per_device_year_{key}']:.2f} days empty per device-year"
            )
    except KeyError:  # another set of figures than this summary knows: all of them
        for name, value in figures.items():
            print(f"   {name}: {value:,.3f}" if isinstance(value, float) else f"   {name}: {value}")


async def setup(
    args: argparse.Namespace, data_dir: Path, tokens: dict[str, str], consent: Any, server: Any
) -> tuple[list[dict[str, Any]], str]:
    storefront = tokens["service:storefront"]
    started = time.perf_counter()
    # The telemetry's devices, then the storms' (STORM_SLOTS a round) and the consent probe.
    specs = simulated_specs(args.devices + STORM_SLOTS * args.rounds + 1, "bench-c-")
    async with grpc.aio.insecure_channel(server.address) as channel:
        registered = await register_devices(channel, storefront, specs, DeviceBook(None))
        print(f"registered {len(registered)} devices in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        await grant_all(consent.address, storefront, [c.customer_id for c in registered])
        print(f"granted {AUTOMATIC_ORDERING} to their customers in {time.perf_counter() - started:.1f} s")
        devices = [
            {"device_id": c.device_id, "token": c.token, "slot_id": spec.slots[0].slot_id}
            for c, spec in zip(registered, specs, strict=True)
        ]
        waited = time.perf_counter()
        why = await wait_for_consent(channel, devices[-1])
    if not why:
        print(
            f"the replenishment service's consent cache had every grant after {time.perf_counter() - waited:.2f} s"
        )
    return devices, why


def bench(args: argparse.Namespace) -> None:
    split = None if args.no_pin else cpu_split()
    args.client_cores = split[1] if split else None
    print(load_average())
    with tempfile.TemporaryDirectory(prefix="najimi-bench-") as tmp:
        data_dir = Path(tmp)
        tokens = ensure_dev_tokens(data_dir)
        metrics_port = free_port()
        consent = start_service("consent", data_dir, tokens, args.client_cores, {})
        server = start_service(
            "replenishment",
            data_dir,
            tokens,
            split[0] if split else None,
            {"NAJIMI_CONSENT_ADDRESS": consent.address, "NAJIMI_METRICS_PORT": str(metrics_port)},
        )
        print(
            f"replenishment service on {server.address} (pid {server.process.pid}"
            + (
                f", pinned to CPU {sorted(split[0])}; consent, h2load and the load client on CPU {sorted(split[1])})"
                if split
                else ")"
            )
        )
        crashed = False
        try:
            with pinned(args.client_cores):
                devices, why = asyncio.run(setup(args, data_dir, tokens, consent, server))
            devices_json = data_dir / "bench-devices.json"
            devices_json.write_text(json.dumps(devices[: args.devices]))
            telemetry_rounds(args, server, metrics_port, devices_json, data_dir)
            if args.telemetry_only:
                pass
            elif why:
                print(f"\n2./3. Replenish and the retry storm: not measured: {why}")
            else:
                replenish_json = data_dir / "replenish-devices.json"
                replenish_json.write_text(json.dumps(devices[:REPLENISH_DEVICES]))
                replenish_rounds(args, server, replenish_json)
                storm_rounds(args, server, devices, tokens["admin"], data_dir)
        except BenchFailure as failure:
            crashed = True
            print(f"\nBENCH FAILURE: {failure}")
        finally:
            warnings = Counter(
                f"{entry.get('level')} {entry.get('event')}"
                for entry in map(_log_entry, server.lines)
                if entry.get("level") in ("warning", "error", "critical")
            )
            if warnings:
                print(f"\nthe replenishment service logged: {dict(warnings.most_common(8))}")
            for process in (server, consent):
                code = process.terminate()
                if code != 0:
                    crashed = True
                    print(f"{process.service} exited {code}; its log ends:\n{''.join(process.lines[-30:])}")
    if not args.telemetry_only:
        forecast_accuracy()
    if crashed:
        sys.exit(1)


def main() -> None:
    if "--client" in sys.argv[1:]:
        run_client(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    parser.add_argument("--devices", type=int, default=DEVICES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--round-seconds", type=float, default=ROUND_SECONDS)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    parser.add_argument("--storm-seconds", type=float, default=STORM_SECONDS)
    parser.add_argument(
        "--readings-per-call",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(READINGS_PER_CALL),
        help="telemetry batch sizes, comma-separated (default: 1,10)",
    )
    parser.add_argument(
        "--stream-calls",
        type=int,
        default=STREAM_CALLS,
        help="StreamTelemetry streams (h2load) a round; 0 leaves the streaming variant out",
    )
    parser.add_argument("--stream-messages", type=int, default=STREAM_MESSAGES, help="messages a stream")
    parser.add_argument(
        "--telemetry-only", action="store_true", help="section 1 only (no Replenish, storms, forecast)"
    )
    bench(parser.parse_args())


if __name__ == "__main__":
    main()
