"""Profile benchmark: sustained event ingestion on SQLite and PostgreSQL, and GetCustomer and
GetTraits against the gRPC floor.

Run by `make bench` as `.venv/bin/python bench/profile_bench.py`. It starts a real consent
service and, per storage back end, a real profile service process (port 0; SQLite in a
temporary data directory, then PostgreSQL in a throwaway cluster of tests/postgres.py,
skipped with the reason printed when one cannot start). It creates customers, grants
them consent (events are collected only when consented), waits until the profile
service's consent cache has every grant, and measures, each figure printed with how it
was measured, then a summary table against the targets. The targets are informational:
the exit code is 0 unless something crashed (the bench, or a service exiting non-zero on
SIGTERM, whose last log lines are then printed). An RPC the profile service does not
implement yet (UNIMPLEMENTED) is reported as unavailable, not as a crash.

1. Sustained ingestion: events acknowledged per second through IngestEvents (unary
   batches of 1000 events, several in flight) and through StreamEvents (several
   streams, each with several messages of 1000 events in flight), from a separate load
   client process, counted over a fixed window after a warm-up. Each event is fresh (a
   new event_id) and belongs to a consented customer, so each should be ACCEPTED.
2. The gRPC floor, GetCustomer and GetTraits: h2load (bench/measure.py) keeps 256
   pre-encoded calls in flight, health Check (the floor), GetCustomer and GetTraits in
   alternating rounds in the same run, after the ingestion (so each customer has events);
   every call is checked as answered OK. Printed per kind: the median and the range of
   the rounds' calls/s, and of GetCustomer's share of the floor of the same round.
On a machine with two or more cores the profile service is pinned to one core and h2load,
the load client, the consent service and PostgreSQL to another, so that the measured
server, not its load, is the limit.

Options: --no-pin leaves CPU placement to the scheduler; --seconds, --customers, --rounds,
--round-seconds, --h2-connections, --h2-streams, --in-flight, --batch change the sizes;
--backends chooses sqlite, postgresql or both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from measure import (
    BenchFailure,
    CallKind,
    Generator,
    Round,
    Spread,
    add_generator_arguments,
    cpu_split,
    describe_rounds,
    health_kind,
    load_average,
    percentile,
    process_cpu_seconds,
    ratios,
    round_lines,
)
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from tests.postgres import free_port

RECS = "personalize.recommendations"
PROFILING = "personalize.profiling"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"

CUSTOMERS = 1_000  # created and granted; the events and the reads cycle over them
ITEMS = 500  # distinct item ids in the events
INGEST_SECONDS = 6.0  # the measured window of each ingestion run
INGEST_WARMUP_SECONDS = 1.0  # sent but not counted, before the window
BATCH_EVENTS = 1_000  # events per IngestEvents call and per StreamEvents message (the maximum)
BATCHES_IN_FLIGHT = 4  # concurrent IngestEvents calls
STREAMS = 4  # concurrent StreamEvents streams
STREAM_WINDOW = 2  # messages in flight (sent, not yet answered) per stream
ROUNDS = 5  # alternating rounds per kind: H, C, T, H, C, T, ...
ROUND_SECONDS = 2.5  # about, per round (sized from the warm-up's rate)
SETUP_CONCURRENCY = 8  # CreateCustomer / GrantConsent calls in flight while setting up
CONSENT_WAIT_SECONDS = 60.0  # for the profile service's cache to see every grant
IDLE_STEP_SECONDS = 0.5  # after an ingestion run, the service is idle when it used ...
IDLE_SHARE = 0.05  # ... less than this share of a core over a step
IDLE_TIMEOUT_SECONDS = 300.0

TARGET_STREAM_EVENTS = {"sqlite": 30_000.0, "postgresql": 15_000.0}
TARGET_GET_SHARE = 80.0  # GetCustomer throughput, % of the floor's

GET_CUSTOMER_PATH = "/najimi.profile.v1.ProfileService/GetCustomer"
GET_TRAITS_PATH = "/najimi.profile.v1.ProfileService/GetTraits"
INGEST_PATH = "/najimi.profile.v1.ProfileService/IngestEvents"
STREAM_PATH = "/najimi.profile.v1.ProfileService/StreamEvents"


# Small helpers -------------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """`root` and its children (PostgreSQL's postmaster and its backends), from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if parent == root:
                children.append(int(entry.name))
    return [root, *children]


def cpu_of(pids: Sequence[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        seconds = process_cpu_seconds(pid)
        if seconds is not None:
            found[pid] = seconds
    return found


async def wait_until_idle(pids: Callable[[], list[int]]) -> float | None:
    """Seconds until the processes together used under IDLE_SHARE of a core over
    IDLE_STEP_SECONDS; None on timeout or when /proc cannot tell."""
    started = time.perf_counter()
    before = cpu_of(pids())
    if not before:
        return None
    while time.perf_counter() - started < IDLE_TIMEOUT_SECONDS:
        await asyncio.sleep(IDLE_STEP_SECONDS)
        after = cpu_of(pids())
        used = sum(seconds - before[pid] for pid, seconds in after.items() if pid in before)
        if used < IDLE_SHARE * IDLE_STEP_SECONDS:
            return time.perf_counter() - started - IDLE_STEP_SECONDS
        before = after
    return None


def customer_ids(count: int) -> list[str]:
    return [f"bench-c-{n:05d}" for n in range(count)]


class pinned:
    """Within the block, this process (and so any child it starts) runs on `cores` only."""

    def __init__(self, cores: set[int] | None):
        self.cores = cores
        self.own: set[int] | None = None

    def __enter__(self) -> None:
        if self.cores is not None:
            self.own = os.sched_getaffinity(0)
            os.sched_setaffinity(0, self.cores)

    def __exit__(self, *_: object) -> None:
        if self.own is not None:
            os.sched_setaffinity(0, self.own)


# Events, encoded fast ------------------------------------------------------------------
#
# The load client sends pre-encoded request bytes (the stubs' serializer is bypassed), so
# that building 1000 events costs the client about a millisecond and the figure measures
# the server. An event's bytes are its event_id and order_id fields followed by a
# pre-serialized template of the rest (protobuf fields may come in any order).


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def event_templates(customers: Sequence[str], now_us: int) -> list[tuple[bytes, bool]]:
    """Per customer, a product view, an add-to-cart and a purchase (serialized without
    event_id and order_id), with (template, needs an order id)."""
    rng = random.Random(7)
    templates: list[tuple[bytes, bool]] = []
    for customer in customers:
        for kind in (pb.EVENT_TYPE_PRODUCT_VIEW, pb.EVENT_TYPE_ADD_TO_CART, pb.EVENT_TYPE_PURCHASE):
            item = rng.randrange(ITEMS)
            event = pb.Event(
                customer_id=customer,
                channel=rng.choice((pb.CHANNEL_WEB, pb.CHANNEL_MOBILE_APP)),
                event_type=kind,
                items=[
                    pb.EventItem(
                        item_id=f"item-{item:04d}",
                        category_path=["bench", f"group-{item % 20:02d}"],
                        quantity=1,
                        unit_price_micros=1_980_000_000,
                        currency_code="JPY",
                    )
                ],
            )
            event.occur_time.FromMicroseconds(now_us - rng.randrange(180 * 86_400) * 1_000_000)
            if kind == pb.EVENT_TYPE_PURCHASE:
                event.value_micros = 1_980_000_000
                event.currency_code = "JPY"
            templates.append((event.SerializeToString(), kind == pb.EVENT_TYPE_PURCHASE))
    return templates


class EventSource:
    """Hands out request bytes of `size` fresh events each (field 1 of IngestEventsRequest
    and StreamEventsRequest alike), cycling over the templates."""

    def __init__(self, templates: list[tuple[bytes, bool]], prefix: str, size: int):
        self.templates = templates
        self.prefix = prefix
        self.size = size
        self.next = 0

    def batch(self) -> bytes:
        parts = []
        templates, count = self.templates, len(self.templates)
        for n in range(self.next, self.next + self.size):
            event_id = f"{self.prefix}{n}".encode()
            template, needs_order = templates[n % count]
            head = b"\x0a" + varint(len(event_id)) + event_id
            if needs_order:
                head += b"\x62" + varint(len(event_id)) + event_id  # order_id = event_id
            body = head + template
            parts.append(b"\x0a" + varint(len(body)) + body)
        self.next += self.size
        return b"".join(parts)


# The load client (a separate process) ------------------------------------------------------


@dataclass
class Window:
    """Acknowledgements counted between `start` and `end` (perf_counter seconds)."""

    start: float
    end: float
    statuses: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # per message, seconds
    messages: int = 0

    def record(self, sent: float, replied: float, results: Sequence[pb.EventResult]) -> None:
        if self.start <= replied <= self.end:
            self.messages += 1
            self.latencies.append(replied - sent)
            for result in results:
                self.statuses[pb.EventResultStatus.Name(result.status)] += 1


async def cpu_over_window(window: Window, server_pid: int) -> dict[str, float | None]:
    """The server's and this process's CPU seconds over the window."""
    await asyncio.sleep(max(0.0, window.start - time.perf_counter()))
    server_before, client_before = process_cpu_seconds(server_pid), time.process_time()
    await asyncio.sleep(max(0.0, window.end - time.perf_counter()))
    server_after, client_after = process_cpu_seconds(server_pid), time.process_time()
    server = None if server_before is None or server_after is None else server_after - server_before
    return {"server_cpu_s": server, "client_cpu_s": client_after - client_before}


async def ingest_batches(channel: grpc.aio.Channel, metadata: Any, source: EventSource, args: Any) -> Any:
    ingest = channel.unary_unary(
        INGEST_PATH, request_serializer=None, response_deserializer=pb.IngestEventsResponse.FromString
    )
    now = time.perf_counter()
    window = Window(now + args.warmup_seconds, now + args.warmup_seconds + args.seconds)

    async def worker() -> None:
        while time.perf_counter() < window.end:
            payload = source.batch()
            sent = time.perf_counter()
            reply = await ingest(payload, metadata=metadata, timeout=60)
            window.record(sent, time.perf_counter(), reply.results)

    cpu = asyncio.create_task(cpu_over_window(window, args.server_pid))
    await asyncio.gather(*(worker() for _ in range(args.in_flight)))
    return window, await cpu


async def ingest_streams(channel: grpc.aio.Channel, metadata: Any, source: EventSource, args: Any) -> Any:
    open_stream = channel.stream_stream(
        STREAM_PATH, request_serializer=None, response_deserializer=pb.StreamEventsResponse.FromString
    )
    now = time.perf_counter()
    window = Window(now + args.warmup_seconds, now + args.warmup_seconds + args.seconds)

    async def stream() -> None:
        call = open_stream(metadata=metadata, timeout=120)
        room = asyncio.Semaphore(args.stream_window)
        sent_at: deque[float] = deque()

        async def read() -> None:
            try:
                while True:
                    reply = await call.read()
                    if reply is grpc.aio.EOF:
                        return
                    window.record(sent_at.popleft(), time.perf_counter(), reply.results)
                    room.release()
            finally:
                for _ in range(args.stream_window + 1):  # never leave the writer waiting for room
                    room.release()

        reader = asyncio.create_task(read())
        while time.perf_counter() < window.end and not reader.done():
            await room.acquire()
            payload = source.batch()
            sent_at.append(time.perf_counter())
            await call.write(payload)
        await call.done_writing()
        await reader
        code = await call.code()
        if code != grpc.StatusCode.OK:
            raise RuntimeError(f"StreamEvents ended with {code}: {await call.details()}")

    cpu = asyncio.create_task(cpu_over_window(window, args.server_pid))
    await asyncio.gather(*(stream() for _ in range(args.streams)))
    return window, await cpu


def window_summary(window: Window, cpu: dict[str, float | None], seconds: float) -> dict[str, Any]:
    latencies = sorted(window.latencies)
    # Acknowledged: committed now (ACCEPTED) or before (DUPLICATE); every event sent is new.
    acknowledged = (
        window.statuses["EVENT_RESULT_STATUS_ACCEPTED"] + window.statuses["EVENT_RESULT_STATUS_DUPLICATE"]
    )
    return {
        "events_per_second": acknowledged / seconds,
        "acknowledged": acknowledged,
        "statuses": dict(window.statuses),
        "messages": window.messages,
        "p50_ms": percentile(latencies, 0.50) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "seconds": seconds,
        **cpu,
    }


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {args.token}"),)
    options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(args.address, options=options) as channel:
        customers = customer_ids(args.customers)
        templates = event_templates(customers, int(time.time() * 1e6))
        source = EventSource(templates, f"{args.prefix}-", args.batch)
        check = pb.IngestEventsRequest.FromString(EventSource(templates, "check-", 3).batch())
        if [e.event_id for e in check.events] != ["check-0", "check-1", "check-2"]:
            raise RuntimeError(f"the fast event encoding is broken: {check}")
        run = ingest_batches if args.mode == "batch" else ingest_streams
        window, cpu = await run(channel, metadata, source, args)
        return window_summary(window, cpu, args.seconds)


def run_client(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--mode", choices=("batch", "stream"), required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--customers", type=int, required=True)
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--seconds", type=float, default=INGEST_SECONDS)
    parser.add_argument("--warmup-seconds", type=float, default=INGEST_WARMUP_SECONDS)
    parser.add_argument("--batch", type=int, default=BATCH_EVENTS)
    parser.add_argument("--in-flight", type=int, default=BATCHES_IN_FLIGHT)
    parser.add_argument("--streams", type=int, default=STREAMS)
    parser.add_argument("--stream-window", type=int, default=STREAM_WINDOW)
    parser.add_argument("--cpus", default="")
    args = parser.parse_args(argv)
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    print(json.dumps(asyncio.run(client_main(args))))


# The bench (this process) ----------------------------------------------------------------


def explain(text: str) -> None:
    """Prints how a figure was measured, wrapped under its heading."""
    print(
        textwrap.fill(
            text, width=100, initial_indent="   How: ", subsequent_indent="        ", break_on_hyphens=False
        )
    )


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


def start_service(
    name: str, data_dir: Path, tokens: dict[str, str], cores: set[int] | None, extra: dict[str, str]
) -> ServiceProcess:
    env = {
        "NAJIMI_DATA_DIR": str(data_dir),
        "NAJIMI_PORT": "0",
        "NAJIMI_METRICS_PORT": "0",
        # The per-RPC access log off, as a high-rate deployment runs it (NAJIMI_ACCESS_LOG).
        "NAJIMI_ACCESS_LOG": "false",
        "NAJIMI_SERVICE_TOKEN": tokens[f"service:{name}"],
        "PYTHONFAULTHANDLER": "1",  # a crash of the service prints its Python stacks to the log
        **extra,
    }
    # The child inherits this process's CPU affinity at fork.
    with pinned(cores):
        server = ServiceProcess(name, env, data_dir / f"{name}-{uuid.uuid4().hex[:6]}.log")
    server.wait_serving()
    return server


async def in_parallel(calls: Sequence[Callable[[], Awaitable[Any]]], concurrency: int) -> float:
    """Runs the calls, `concurrency` at a time; returns the seconds taken."""
    queue = list(reversed(calls))

    async def worker() -> None:
        while queue:
            await queue.pop()()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def grant_all(address: str, token: str, customers: list[str]) -> float:
    """Grants recommendations and profiling (purchases, browsing) to every customer, with one
    SetConsents per customer; returns the seconds taken."""
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)

        def grant(customer: str) -> Callable[[], Awaitable[Any]]:
            request = consent_pb.SetConsentsRequest(
                customer_id=customer,
                decisions=[
                    consent_pb.ConsentDecisionInput(
                        purpose=purpose,
                        decision=consent_pb.CONSENT_DECISION_GRANTED,
                        data_categories=[PURCHASES, BROWSING],
                        notice_version=1,
                    )
                    for purpose in (RECS, PROFILING)
                ],
                collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
                jurisdiction="JP",
                request_id=f"bench-grant-{customer}",
            )
            return lambda: stub.SetConsents(request, metadata=metadata, timeout=30)

        return await in_parallel([grant(c) for c in customers], SETUP_CONCURRENCY)


async def create_customers(stub: pb_grpc.ProfileServiceStub, metadata: Any, customers: list[str]) -> float:
    def create(customer: str) -> Callable[[], Awaitable[Any]]:
        request = pb.CreateCustomerRequest(
            request_id=f"bench-create-{customer}",
            customer_id=customer,
            customer=pb.Customer(
                display_name=f"Bench Customer {customer[-5:]}",
                email=f"{customer}@example.com",
                birth_year=1960 + int(customer[-5:]) % 45,
                gender=pb.GENDER_FEMALE if int(customer[-5:]) % 2 else pb.GENDER_MALE,
                region="JP-13",
                language_code="ja",
            ),
        )
        return lambda: stub.CreateCustomer(request, metadata=metadata, timeout=30)

    return await in_parallel([create(c) for c in customers], SETUP_CONCURRENCY)


async def wait_for_consent(stub: pb_grpc.ProfileServiceStub, metadata: Any, customer: str) -> str:
    """Sends a probe event for the last granted customer until it is accepted: the consent
    feed is ordered, so the profile service's cache then has every grant. Returns "" or why
    ingestion cannot be measured."""
    deadline = time.monotonic() + CONSENT_WAIT_SECONDS
    attempt = 0
    while True:
        attempt += 1
        probe = pb.Event(
            event_id=f"probe-{uuid.uuid4().hex[:12]}",
            customer_id=customer,
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
            items=[pb.EventItem(item_id="item-0000")],
        )
        probe.occur_time.GetCurrentTime()
        try:
            reply = await stub.IngestEvents(
                pb.IngestEventsRequest(events=[probe]), metadata=metadata, timeout=30
            )
            status = reply.results[0].status
            if status == pb.EVENT_RESULT_STATUS_ACCEPTED:
                return ""
            if status != pb.EVENT_RESULT_STATUS_REJECTED_CONSENT:
                return f"the probe event came back {pb.EventResultStatus.Name(status)}: {reply.results[0]}"
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                return "IngestEvents is not implemented yet (UNIMPLEMENTED)"
            if error.code() != grpc.StatusCode.UNAVAILABLE:  # UNAVAILABLE: consent cache not fresh yet
                raise
        if time.monotonic() > deadline:
            return f"the profile service's consent cache did not see the grants within {CONSENT_WAIT_SECONDS:.0f} s"
        await asyncio.sleep(0.05)


async def probe_stream(channel: grpc.aio.Channel, metadata: Any, customer: str) -> str:
    """ "" when StreamEvents answers, else why not (UNIMPLEMENTED)."""
    stub = pb_grpc.ProfileServiceStub(channel)
    event = pb.Event(
        event_id=f"probe-{uuid.uuid4().hex[:12]}",
        customer_id=customer,
        channel=pb.CHANNEL_WEB,
        event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
        items=[pb.EventItem(item_id="item-0000")],
    )
    event.occur_time.GetCurrentTime()
    call = stub.StreamEvents(metadata=metadata, timeout=30)
    try:
        await call.write(pb.StreamEventsRequest(events=[event]))
        await call.read()
        await call.done_writing()
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return "StreamEvents is not implemented yet (UNIMPLEMENTED)"
        raise
    code = await call.code()
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return "StreamEvents is not implemented yet (UNIMPLEMENTED)"
    if code != grpc.StatusCode.OK:
        raise RuntimeError(f"the StreamEvents probe ended with {code}: {await call.details()}")
    return ""


async def probe_traits(stub: pb_grpc.ProfileServiceStub, metadata: Any, customer: str) -> str:
    try:
        await stub.GetTraits(pb.GetTraitsRequest(customer_id=customer), metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNIMPLEMENTED:
            return "GetTraits is not implemented yet (UNIMPLEMENTED)"
        raise
    return ""


def run_load_client(
    server: ServiceProcess, token: str, args: argparse.Namespace, split: Any, mode: str, extra: Sequence[str]
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        f"--mode={mode}",
        f"--address={server.address}",
        f"--token={token}",
        f"--server-pid={server.process.pid}",
        f"--customers={args.customers}",
        f"--seconds={args.seconds}",
        f"--batch={args.batch}",
        f"--in-flight={args.in_flight}",
        f"--streams={args.streams}",
        f"--stream-window={args.stream_window}",
        *extra,
    ]
    if split is not None:
        command.append("--cpus=" + ",".join(str(c) for c in sorted(split[1])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load client ({mode}) failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@dataclass
class BackendResult:
    backend: str
    skipped: str = ""  # why the back end was not measured
    ingest: dict[str, dict[str, Any]] = field(default_factory=dict)  # mode -> figures
    ingest_unavailable: dict[str, str] = field(default_factory=dict)  # mode -> why
    unary: dict[str, list[Round]] = field(default_factory=dict)  # kind -> rounds
    unary_unavailable: dict[str, str] = field(default_factory=dict)
    exit_code: int = 0


def print_ingestion(backend: str, mode: str, figures: dict[str, Any], args: argparse.Namespace) -> None:
    statuses = ", ".join(
        f"{n} {s.removeprefix('EVENT_RESULT_STATUS_')}" for s, n in figures["statuses"].items()
    )
    server_cpu = figures.get("server_cpu_s")
    cpu_text = (
        f"server CPU {100 * server_cpu / figures['seconds']:.0f}% of a core, "
        if server_cpu is not None
        else ""
    )
    print(
        f"   {mode:13s} {figures['events_per_second']:8.0f} events/s   per message of {args.batch}: "
        f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms"
    )
    print(
        f"                 {cpu_text}load client CPU "
        f"{100 * figures['client_cpu_s'] / figures['seconds']:.0f}%; results: {statuses or 'none'}"
    )


async def run_backend(
    backend: str,
    database_url: str,
    data_dir: Path,
    tokens: dict[str, str],
    consent: ServiceProcess,
    args: argparse.Namespace,
    split: Any,
    postgres_pid: int | None = None,
) -> BackendResult:
    result = BackendResult(backend)
    customers = customer_ids(args.customers)

    def busy_pids() -> list[int]:
        return [
            server.process.pid,
            traits.process.pid,
            *(process_tree(postgres_pid) if postgres_pid else []),
        ]

    storefront = tokens["service:storefront"]
    metadata = (("authorization", f"Bearer {storefront}"),)
    started = time.perf_counter()
    metrics_port = free_port()
    server = start_service(
        "profile",
        data_dir,
        tokens,
        split[0] if split else None,
        {
            "NAJIMI_DATABASE_URL": database_url,
            "NAJIMI_CONSENT_ADDRESS": consent.address,
            "NAJIMI_PROFILE_TRAIT_WORKER": "external",
            # The bench reads the per-RPC counts by code there, to check every call was OK.
            "NAJIMI_METRICS_PORT": str(metrics_port),
        },
    )
    # The traits are kept current by a trait worker process of their own, on the other core
    # (as deployed: services/profile/trait_process.py), not beside ingestion.
    with pinned(split[1] if split else None):
        traits = ServiceProcess(
            "profile.trait_process",
            {"NAJIMI_DATA_DIR": str(data_dir), "NAJIMI_DATABASE_URL": database_url},
            data_dir / f"trait-process-{uuid.uuid4().hex[:6]}.log",
        )
    print(f"\n== {backend}: profile service on {server.address} (pid {server.process.pid})")
    print(f"   started and SERVING in {time.perf_counter() - started:.1f} s; database {database_url}")
    print(f"   trait worker process (pid {traits.process.pid}) beside it, pinned with the load client")
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.ProfileServiceStub(channel)
            seconds = await create_customers(stub, metadata, customers)
            print(
                f"   created {len(customers)} customers in {seconds:.1f} s ({len(customers) / seconds:.0f}/s)"
            )
            waited = time.perf_counter()
            why = await wait_for_consent(stub, metadata, customers[-1])
            if why:
                result.ingest_unavailable = {"batch": why, "stream": why}
            else:
                print(
                    f"   the profile service's consent cache had every grant after {time.perf_counter() - waited:.2f} s"
                )
                stream_why = await probe_stream(channel, metadata, customers[0])
                if stream_why:
                    result.ingest_unavailable["stream"] = stream_why

        # 1. Sustained ingestion.
        print(f"\n   1. Sustained ingestion ({backend})")
        explain(
            f"a separate load client process (grpc.aio, one channel) sends pre-encoded batches of "
            f"{args.batch} fresh events (a new event_id each; views, add-to-carts and purchases of the "
            f"{len(customers)} consented customers, one item each); batch: {args.in_flight} IngestEvents "
            f"calls in flight; stream: {args.streams} StreamEvents streams with {args.stream_window} messages in "
            f"flight each. Events/s = results received within a {args.seconds:.0f} s window that starts "
            f"after {INGEST_WARMUP_SECONDS:.0f} s of warm-up, divided by the window; each result is sent "
            "only after its event is committed. Latency = one message's send to its result, client side. "
            "Server CPU from /proc over the window. The traits are kept current meanwhile by a trait "
            "worker process on the load client's core (NAJIMI_PROFILE_TRAIT_WORKER=external); run in the "
            "service instead (the default, inline), it shares the service's core and costs it about 14 µs "
            "per event on SQLite."
        )
        for mode, label in (("batch", "IngestEvents"), ("stream", "StreamEvents")):
            if mode in result.ingest_unavailable:
                print(f"   {label:13s} unavailable: {result.ingest_unavailable[mode]}")
                continue
            figures = await asyncio.to_thread(
                run_load_client, server, storefront, args, split, mode, [f"--prefix={backend[:2]}-{mode}"]
            )
            result.ingest[mode] = figures
            print_ingestion(backend, label, figures, args)
            # The trait worker follows the events in the background; let it catch up, so that
            # the next measurement does not share the core with its backlog.
            busy = await wait_until_idle(busy_pids)
            figures["catch_up_s"] = busy
            print(
                f"                 afterwards the service{' and PostgreSQL' if postgres_pid else ''} worked "
                + (f"{busy:.1f} s more" if busy is not None else f"more than {IDLE_TIMEOUT_SECONDS:.0f} s")
                + " until idle (the trait worker process adding the events to the trait aggregates)"
            )

        if args.only_ingestion:
            return result

        # 2. The floor, GetCustomer and GetTraits, from h2load.
        async with grpc.aio.insecure_channel(server.address) as channel:
            why = await probe_traits(pb_grpc.ProfileServiceStub(channel), metadata, customers[0])
        names = ["health", "get_customer"]
        if why:
            result.unary_unavailable["get_traits"] = why
        else:
            names.append("get_traits")
        rounds, generator = await asyncio.to_thread(
            measure_reads, server, metrics_port, storefront, customers[0], names, args, split, data_dir
        )
        result.unary = rounds
        print(f"\n   2. gRPC floor vs GetCustomer and GetTraits ({backend})")
        explain(
            f"{generator}. {describe_rounds(rounds, args.round_seconds)}. Calls/s = calls / first start "
            "to last end of the round (h2load's log); latency = h2load's, per call. Health Check "
            "(service '', no token) is the floor. GetCustomer and GetTraits (service:storefront token, so "
            "PII is masked) ask for one customer, after the ingestion above (the customer has its events) "
            "and once the service (and PostgreSQL) went idle again. After the warm-up, GetCustomer answers "
            "come from the replica's cache of masked answers (services/profile/customer_cache.py; the "
            "customer does not change meanwhile), as they would for any customer read again; one the cache "
            "cannot answer costs two queries and three decryptions (about 1 ms of server CPU on SQLite). "
            "Share = calls/s over the floor's of the same round. Server CPU from /proc, h2load's from its "
            "rusage."
        )
        for kind, label in (
            ("health", "health Check"),
            ("get_customer", "GetCustomer"),
            ("get_traits", "GetTraits"),
        ):
            if kind not in rounds:
                print(f"   {label:13s} unavailable: {result.unary_unavailable.get(kind, 'not measured')}")
                continue
            print(
                f"   {label:13s} {round_lines(rounds[kind], None if kind == 'health' else rounds['health'])}"
            )
        print(f"   {load_average()} after the rounds")
    finally:
        result.exit_code = server.terminate()
        traits_exit = traits.terminate()
        if traits_exit != 0:
            print(f"\ntrait worker process ({backend}) exited with {traits_exit} on SIGTERM:")
            print("".join(traits.lines[-40:]), end="")
            result.exit_code = result.exit_code or traits_exit
        if result.exit_code != 0:
            tail = [line for line in server.lines if '"event": "rpc"' not in line][-40:]
            print(
                f"\nprofile service ({backend}) exited with {result.exit_code} on SIGTERM; its last log lines:"
            )
            print("".join(tail), end="")
    return result


def measure_reads(
    server: ServiceProcess,
    metrics_port: int,
    token: str,
    customer: str,
    names: list[str],
    args: argparse.Namespace,
    split: Any,
    workdir: Path,
) -> tuple[dict[str, list[Round]], str]:
    """Health Check, GetCustomer and GetTraits from h2load in alternating rounds; every call
    checked OK. Returns the rounds per kind and how the generator ran."""
    metadata = (("authorization", f"Bearer {token}"),)
    get_request = pb.GetCustomerRequest(customer_id=customer)
    traits_request = pb.GetTraitsRequest(customer_id=customer)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ProfileServiceStub(channel)

        def get_probe() -> bytes:
            reply = stub.GetCustomer(get_request, metadata=metadata, timeout=10)
            if reply.customer.customer_id != customer:
                raise BenchFailure(f"GetCustomer answered another customer: {reply}")
            return reply.SerializeToString()

        def traits_probe() -> bytes:
            reply = stub.GetTraits(traits_request, metadata=metadata, timeout=10)
            return reply.SerializeToString()

        kinds = {
            "health": health_kind(channel),
            "get_customer": CallKind(
                "get_customer",
                GET_CUSTOMER_PATH,
                get_request.SerializeToString(),
                token,
                ("profile", "GetCustomer"),
                get_probe,
            ),
            "get_traits": CallKind(
                "get_traits",
                GET_TRAITS_PATH,
                traits_request.SerializeToString(),
                token,
                ("profile", "GetTraits"),
                traits_probe,
                same_reply=False,  # a time in the reply: its size varies by a byte or two
            ),
        }
        generator = Generator.from_args(
            args, server.address, server.process.pid, metrics_port, split[1] if split else None, workdir
        )
        rounds = generator.alternating_rounds(
            [kinds[name] for name in names], args.rounds, args.round_seconds
        )
    return rounds, generator.describe()


def start_postgres(cores: set[int] | None) -> tuple[Any, str]:
    """A throwaway cluster (tests/postgres.py) and a database URL; raises when it cannot start."""
    from tests.postgres import PostgresCluster

    with pinned(cores):
        cluster = PostgresCluster()
        try:
            cluster.start()
        except Exception:
            cluster.stop()
            raise
    return cluster, cluster.create_database("profile_bench")


def summary_rows(results: list[BackendResult]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for result in results:
        name = result.backend
        if result.skipped:
            rows.append((f"{name}: everything", "not measured", "", result.skipped[:60]))
            continue
        for mode, label in (("batch", "IngestEvents (batch)"), ("stream", "StreamEvents (streaming)")):
            figures = result.ingest.get(mode)
            target = TARGET_STREAM_EVENTS[name] if mode == "stream" else None
            target_text = f"≥ {target:,.0f} events/s" if target else "—"
            if figures is None:
                rows.append((f"{name}: {label}", "unavailable", target_text, ""))
                continue
            rate = figures["events_per_second"]
            rows.append(
                (
                    f"{name}: {label}",
                    f"{rate:,.0f} events/s",
                    target_text,
                    verdict(rate >= target) if target else "",
                )
            )
        unary = result.unary
        for kind, label in (
            ("health", "health Check (floor)"),
            ("get_customer", "GetCustomer"),
            ("get_traits", "GetTraits"),
        ):
            if kind not in unary:
                rows.append((f"{name}: {label}", "unavailable", "", ""))
                continue
            rate = Spread.of([r.per_second for r in unary[kind]]).median
            p99 = Spread.of([r.p99_ms for r in unary[kind]]).median
            rows.append((f"{name}: {label}, median", f"{rate:,.0f} calls/s, p99 {p99:.1f} ms", "—", ""))
            if kind == "get_customer" and "health" in unary:
                share = Spread.of([100 * r for r in ratios(unary, "get_customer", "health")])
                rows.append(
                    (
                        f"{name}: GetCustomer / floor, median",
                        f"{share.median:.1f} % ({share.low:.1f}-{share.high:.1f})",
                        f"≥ {TARGET_GET_SHARE:.0f} %",
                        verdict(share.median >= TARGET_GET_SHARE),
                    )
                )
    return rows


async def bench(args: argparse.Namespace) -> None:
    split = None if args.no_pin else cpu_split()
    customers = customer_ids(args.customers)
    results: list[BackendResult] = []
    crashed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="najimi-profile-bench-") as tmp:
        data_dir = Path(tmp)
        tokens = ensure_dev_tokens(data_dir)
        started = time.perf_counter()
        consent = start_service(
            "consent",
            data_dir,
            tokens,
            split[1] if split else None,
            {"NAJIMI_DATABASE_URL": f"sqlite:///{data_dir / 'consent.db'}"},
        )
        print(f"consent service on {consent.address} (pid {consent.process.pid}), SQLite in {data_dir}")
        print(f"  started and SERVING in {time.perf_counter() - started:.1f} s")
        if split:
            print(
                f"  profile service pinned to CPU {sorted(split[0])}; h2load (taskset), the load client, "
                f"consent service, trait worker process and PostgreSQL to CPU {sorted(split[1])}, so that "
                "the profile service is the limit"
            )
        else:
            print("  no CPU pinning (fewer than two cores, or --no-pin)")
        print(f"  {load_average()} before the run")
        try:
            seconds = await grant_all(consent.address, tokens["service:storefront"], customers)
            print(
                f"  granted {RECS} and {PROFILING} ({PURCHASES}, {BROWSING}) to {len(customers)} customers "
                f"in {seconds:.1f} s"
            )
            for backend in args.backends.split(","):
                cluster = None
                if backend == "sqlite":
                    url = f"sqlite:///{data_dir / 'profile.db'}"
                else:
                    try:
                        cluster, url = start_postgres(split[1] if split else None)
                    except Exception as error:
                        reason = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
                        print(f"\n== postgresql: skipped, the throwaway cluster could not start: {reason}")
                        results.append(
                            BackendResult(backend, skipped=f"PostgreSQL could not start: {reason}")
                        )
                        continue
                try:
                    postgres_pid = None
                    if cluster is not None:
                        postgres_pid = int((cluster.data / "postmaster.pid").read_text().split()[0])
                    result = await run_backend(
                        backend, url, data_dir, tokens, consent, args, split, postgres_pid
                    )
                finally:
                    if cluster is not None:
                        cluster.stop()
                results.append(result)
                if result.exit_code != 0:
                    crashed.append(f"profile ({backend}) exited with {result.exit_code}")
        finally:
            code = consent.terminate()
            if code != 0:
                crashed.append(f"consent exited with {code}")
                tail = [line for line in consent.lines if '"event": "rpc"' not in line][-40:]
                print(f"\nconsent service exited with {code} on SIGTERM; its last log lines:")
                print("".join(tail), end="")

    rows = summary_rows(results)
    header = ("figure", "value", "target", "result")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    print()
    print("Summary (informational: a MISS does not change the exit code)")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if crashed:
        print(f"\nFAILED: {'; '.join(crashed)}, see above")
        sys.exit(1)


def main() -> None:
    if "--client" in sys.argv[1:]:
        run_client(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores")
    parser.add_argument("--backends", default="sqlite,postgresql", help="sqlite, postgresql or both")
    parser.add_argument("--customers", type=int, default=CUSTOMERS)
    parser.add_argument(
        "--seconds", type=float, default=INGEST_SECONDS, help="measured window per ingestion run"
    )
    parser.add_argument("--batch", type=int, default=BATCH_EVENTS, help="events per call or stream message")
    parser.add_argument(
        "--in-flight", type=int, default=BATCHES_IN_FLIGHT, help="IngestEvents calls in flight"
    )
    parser.add_argument("--streams", type=int, default=STREAMS, help="concurrent StreamEvents streams")
    parser.add_argument(
        "--stream-window", type=int, default=STREAM_WINDOW, help="messages in flight per stream"
    )
    parser.add_argument(
        "--only-ingestion",
        action="store_true",
        help="no floor, GetCustomer or GetTraits rounds (for profiling)",
    )
    add_generator_arguments(parser, ROUNDS, ROUND_SECONDS)
    args = parser.parse_args()
    unknown = set(args.backends.split(",")) - {"sqlite", "postgresql"}
    if unknown:
        parser.error(f"unknown back ends: {', '.join(sorted(unknown))}")
    try:
        asyncio.run(bench(args))
    except BenchFailure as failure:
        print(f"\nFAILED: {failure}")
        sys.exit(1)


if __name__ == "__main__":
    main()
