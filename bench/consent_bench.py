"""Consent benchmark: the gRPC floor, CheckConsent against it, cached decisions, revocations.

Run by `make bench` as `.venv/bin/python bench/consent_bench.py`. It starts a real consent
service process (SQLite in a temporary data directory, port 0) and prints three figures,
each with how it was measured, then a summary table against the targets. The targets are
informational: the exit code is 0 unless something crashed (the bench itself, or the
consent service exiting non-zero on SIGTERM, whose last log lines are then printed).

1. The gRPC floor and CheckConsent: N concurrent in-flight unary calls from grpc.aio in a
   separate client process (this file run with --client), health Check and CheckConsent
   measured the same way in the same run, in alternating rounds. On a machine with two
   or more cores the server is pinned to one core and the client to another, so the
   client never competes with the server for a core.
2. A cached decision: ConsentCache.check in this process, each call timed on its own.
3. Revocation to cache: WithdrawConsent, then the time until this process's ConsentCache
   (list-then-watch on the server) has applied that revision and denies.

Options: --no-pin leaves CPU placement to the scheduler; --calls, --concurrency,
--revocations change the sizes; --only check (or health) runs only that kind's rounds (no
share of the floor, no figures 2 and 3), to profile the server on that load alone (py-spy or
perf on the printed pid).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from measure import alternating_rounds, cpu_split, percentile
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from shared.consent_cache import ConsentCache
from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"

LOAD_CUSTOMERS = 1_000  # granted RECS; CheckConsent and the cache look them up
CALLS = 20_000  # measured calls per kind (health, CheckConsent), after the warm-up
WARMUP = 2_000  # calls per kind before measuring
ROUNDS = 4  # measured calls are split into alternating rounds: H, C, H, C, ...
CONCURRENCY = 32  # unary calls in flight at once
CACHE_LOOKUPS = 200_000
REVOCATIONS = 200
REVOCATION_TIMEOUT = 5.0  # seconds to wait for one revocation to reach the cache
GRANT_CONCURRENCY = 8

TARGET_CHECK_SHARE = 80.0  # % of the floor
TARGET_CACHE_US = 20.0
TARGET_REVOCATION_P99_MS = 1000.0


# Small helpers -------------------------------------------------------------------------


def customer_ids(prefix: str, count: int) -> list[str]:
    return [f"bench-{prefix}-{n:05d}" for n in range(count)]


# The load client (a separate process) ------------------------------------------------------


async def client_main(args: argparse.Namespace) -> dict[str, Any]:
    customers = customer_ids("c", args.customers)
    metadata = (("authorization", f"Bearer {args.token}"),)
    health_request = health_pb2.HealthCheckRequest(service="")
    check_requests = [
        pb.CheckConsentRequest(customer_id=c, purpose=RECS, data_categories=[PURCHASES]) for c in customers
    ]
    async with grpc.aio.insecure_channel(args.address) as channel:
        health_stub = health_pb2_grpc.HealthStub(channel)
        consent_stub = pb_grpc.ConsentServiceStub(channel)
        turn = 0

        def health_call() -> Awaitable[Any]:
            return health_stub.Check(health_request, timeout=30)

        def check_call() -> Awaitable[Any]:
            nonlocal turn
            turn += 1
            return consent_stub.CheckConsent(
                check_requests[turn % len(check_requests)], metadata=metadata, timeout=30
            )

        kinds = {"health": health_call, "check": check_call}
        summary = await alternating_rounds(
            {kind: kinds[kind] for kind in args.kinds.split(",")},
            calls=args.calls,
            rounds=args.rounds,
            warmup=args.warmup,
            concurrency=args.concurrency,
            server_pid=args.server_pid,
            count_replies={"check": lambda reply: reply.allowed},
        )
    for figures in summary.values():
        figures["allowed"] = figures.pop("counted")
    return summary


def run_client(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", action="store_true")
    parser.add_argument("--address", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--customers", type=int, required=True)
    parser.add_argument("--calls", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--rounds", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--cpus", default="")
    parser.add_argument("--kinds", default="health,check")
    args = parser.parse_args(argv)
    if args.cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    summary = asyncio.run(client_main(args))
    print(json.dumps(summary))


# The bench (this process) ----------------------------------------------------------------


def grant_request(customer_id: str) -> pb.GrantConsentRequest:
    return pb.GrantConsentRequest(
        customer_id=customer_id,
        purpose=RECS,
        data_categories=[PURCHASES, BROWSING],
        notice_version=1,
        collection_method=pb.COLLECTION_METHOD_WEB_FORM,
        jurisdiction="JP",
        request_id=f"bench-grant-{uuid.uuid4().hex}",
    )


def withdraw_request(customer_id: str) -> pb.WithdrawConsentRequest:
    return pb.WithdrawConsentRequest(
        customer_id=customer_id,
        purpose=RECS,
        collection_method=pb.COLLECTION_METHOD_MOBILE_APP,
        jurisdiction="JP",
        request_id=f"bench-withdraw-{uuid.uuid4().hex}",
    )


async def grant_all(stub: pb_grpc.ConsentServiceStub, metadata: Any, customers: list[str]) -> float:
    """Grants RECS to every customer (GRANT_CONCURRENCY in flight); returns the seconds taken."""
    queue = list(reversed(customers))

    async def worker() -> None:
        while queue:
            reply = await stub.GrantConsent(grant_request(queue.pop()), metadata=metadata, timeout=30)
            if reply.consent.status != pb.CONSENT_STATUS_GRANTED:
                raise RuntimeError(f"grant not granted: {reply.consent}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(GRANT_CONCURRENCY)))
    return time.perf_counter() - started


def measure_load(
    server: ServiceProcess, token: str, args: argparse.Namespace, split: tuple[set[int], set[int]] | None
) -> dict[str, Any]:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        f"--address={server.address}",
        f"--token={token}",
        f"--server-pid={server.process.pid}",
        f"--customers={LOAD_CUSTOMERS}",
        f"--calls={args.calls}",
        f"--warmup={WARMUP}",
        f"--rounds={ROUNDS}",
        f"--concurrency={args.concurrency}",
    ]
    if args.only:
        command.append(f"--kinds={args.only}")
    if split is not None:
        command.append("--cpus=" + ",".join(str(c) for c in sorted(split[1])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_cache(cache: ConsentCache, customers: list[str]) -> dict[str, float]:
    """ConsentCache.check over CACHE_LOOKUPS lookups, each timed with perf_counter_ns."""
    check = cache.check
    clock = time.perf_counter_ns
    categories = (PURCHASES,)
    count = len(customers)
    latencies = [0] * CACHE_LOOKUPS
    allowed = 0
    for n in range(CACHE_LOOKUPS):
        customer = customers[n % count]
        started = clock()
        decision = check(customer, RECS, categories)
        latencies[n] = clock() - started
        allowed += decision.allowed
    overhead = [0] * 10_000  # the cost of the two clock reads alone, for reference
    for n in range(len(overhead)):
        started = clock()
        overhead[n] = clock() - started
    latencies.sort()
    overhead.sort()
    return {
        "mean_us": sum(latencies) / len(latencies) / 1e3,
        "p50_us": percentile(latencies, 0.50) / 1e3,
        "p99_us": percentile(latencies, 0.99) / 1e3,
        "p999_us": percentile(latencies, 0.999) / 1e3,
        "max_us": latencies[-1] / 1e3,
        "clock_us": percentile(overhead, 0.50) / 1e3,
        "allowed": allowed,
    }


async def measure_revocations(
    stub: pb_grpc.ConsentServiceStub, metadata: Any, cache: ConsentCache, customers: list[str]
) -> dict[str, Any]:
    """Per revocation: from just before WithdrawConsent is sent until the cache denies."""
    categories = (PURCHASES,)
    latencies: list[float] = []
    rpc_times: list[float] = []
    already_applied = 0
    failures = 0
    for customer in customers:
        if not cache.check(customer, RECS, categories).allowed:
            raise RuntimeError(f"{customer} is not allowed in the cache before its revocation")
        started = time.perf_counter()
        reply = await stub.WithdrawConsent(withdraw_request(customer), metadata=metadata, timeout=30)
        replied = time.perf_counter()
        if cache.revision >= reply.consent.revision:
            already_applied += 1
        deadline = started + REVOCATION_TIMEOUT
        flipped = False
        if await cache.wait_for_revision(reply.consent.revision, REVOCATION_TIMEOUT):
            flipped = not cache.check(customer, RECS, categories).allowed
            while not flipped and time.perf_counter() < deadline:  # should not happen: noted if it does
                await asyncio.sleep(0.001)
                flipped = not cache.check(customer, RECS, categories).allowed
        finished = time.perf_counter()
        if not flipped:
            failures += 1
            continue
        latencies.append((finished - started) * 1e3)
        rpc_times.append((replied - started) * 1e3)
    latencies.sort()
    rpc_times.sort()
    return {
        "count": len(latencies),
        "failures": failures,
        "already_applied": already_applied,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else float("nan"),
        "rpc_p50_ms": percentile(rpc_times, 0.50),
        "rpc_p99_ms": percentile(rpc_times, 0.99),
    }


def start_server(data_dir: Path, tokens: dict[str, str], cores: set[int] | None) -> ServiceProcess:
    env = {
        "NAJIMI_DATA_DIR": str(data_dir),
        "NAJIMI_DATABASE_URL": f"sqlite:///{data_dir / 'consent.db'}",
        "NAJIMI_PORT": "0",
        "NAJIMI_METRICS_PORT": "0",
        # The per-RPC access log off, as a high-rate deployment runs it (NAJIMI_ACCESS_LOG).
        "NAJIMI_ACCESS_LOG": "false",
        "NAJIMI_SERVICE_TOKEN": tokens["service:consent"],
        "PYTHONFAULTHANDLER": "1",  # a crash of the service prints its Python stacks to the log
    }
    # The child inherits this process's CPU affinity at fork: pin it by pinning ourselves
    # for the instant of the start, then give ourselves every core back.
    own = os.sched_getaffinity(0) if cores is not None else None
    if cores is not None:
        os.sched_setaffinity(0, cores)
    try:
        server = ServiceProcess("consent", env, data_dir / "consent.log")
    finally:
        if own is not None:
            os.sched_setaffinity(0, own)
    server.wait_serving()
    return server


def explain(text: str) -> None:
    """Prints how a figure was measured, wrapped under its heading."""
    print(
        textwrap.fill(
            text, width=100, initial_indent="   How: ", subsequent_indent="        ", break_on_hyphens=False
        )
    )


def verdict(passed: bool) -> str:
    return "PASS" if passed else "MISS"


async def bench(args: argparse.Namespace) -> None:
    split = None if args.no_pin else cpu_split()
    load_customers = customer_ids("c", LOAD_CUSTOMERS)
    revoke_customers = customer_ids("r", args.revocations)
    with tempfile.TemporaryDirectory(prefix="najimi-bench-") as tmp:
        data_dir = Path(tmp)
        tokens = ensure_dev_tokens(data_dir)
        storefront = tokens["service:storefront"]
        metadata = (("authorization", f"Bearer {storefront}"),)
        started = time.perf_counter()
        server = start_server(data_dir, tokens, split[0] if split else None)
        print(f"consent service on {server.address} (pid {server.process.pid}), SQLite in {data_dir}")
        print(f"  started and SERVING in {time.perf_counter() - started:.1f} s")
        if split:
            print(f"  server pinned to CPU {sorted(split[0])}, load client to CPU {sorted(split[1])}")
        else:
            print("  no CPU pinning (fewer than two cores, or --no-pin)")
        cache: ConsentCache | None = None
        exit_code = 0
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = pb_grpc.ConsentServiceStub(channel)
                customers = load_customers + revoke_customers
                seconds = await grant_all(stub, metadata, customers)
                print(
                    f"  pre-granted {RECS} to {len(customers)} customers in {seconds:.1f} s "
                    f"({len(customers) / seconds:.0f} GrantConsent/s, {GRANT_CONCURRENCY} in flight)"
                )

                # 1. The floor and CheckConsent, from a separate client process.
                lines_before = len(server.lines)
                load = await asyncio.to_thread(measure_load, server, storefront, args, split)
                if args.only:
                    only = load[args.only]
                    print(
                        f"\n{args.only} only: {only['per_second']:.0f} calls/s, p50 {only['p50_ms']:.2f} ms, "
                        f"p99 {only['p99_ms']:.2f} ms, server CPU "
                        f"{1e6 * (only['server_cpu_s'] or 0) / only['calls']:.0f} µs/call"
                    )
                    return
                lines_logged = len(server.lines) - lines_before
                health, check = load["health"], load["check"]
                share = 100.0 * check["per_second"] / health["per_second"]
                print()
                print("1. gRPC floor vs CheckConsent")
                explain(
                    f"a separate client process (grpc.aio, one channel) keeps {args.concurrency} "
                    f"unary calls in flight; {WARMUP} warm-up calls per kind, then {args.calls} measured "
                    f"calls per kind in {ROUNDS} alternating rounds (health, check, ...). Throughput = "
                    "calls / wall time of the rounds; latency = each call's await, client side. Health "
                    "Check (service '', no token) is the floor: the same server, interceptor passes it "
                    "through untouched. CheckConsent (with a bearer token) cycles over the "
                    f"{LOAD_CUSTOMERS} granted customers, one data category each. Server CPU is the "
                    "server process's utime+stime (/proc) over the rounds."
                )
                for name, figures in (("health Check", health), ("CheckConsent", check)):
                    server_cpu = figures["server_cpu_s"]
                    cpu_text = (
                        f", server CPU {1e6 * server_cpu / figures['calls']:.0f} µs/call "
                        f"({100 * server_cpu / figures['seconds']:.0f}% of a core)"
                        if server_cpu is not None
                        else ""
                    )
                    print(
                        f"   {name:13s} {figures['per_second']:8.0f} calls/s   p50 {figures['p50_ms']:6.2f} ms"
                        f"   p99 {figures['p99_ms']:6.2f} ms{cpu_text}, client CPU "
                        f"{100 * figures['client_cpu_s'] / figures['seconds']:.0f}% of a core"
                    )
                print(
                    f"   CheckConsent allowed in {check['allowed']} of {check['calls']} replies "
                    "(all should be: every checked customer was granted)"
                )
                print(
                    f"   the server wrote {lines_logged} log lines to stderr during the load "
                    "(started with NAJIMI_ACCESS_LOG=false)"
                )
                print(
                    f"   CheckConsent throughput = {share:.1f}% of the floor (target ≥ {TARGET_CHECK_SHARE:.0f}%)"
                )

                # 2. A cached decision.
                cache = ConsentCache(server.address, tokens["service:recommendation"], purposes=[RECS])
                cache.start()
                if not await cache.wait_synced(30):
                    raise RuntimeError("the consent cache did not sync within 30 s")
                cached = measure_cache(cache, load_customers)
                print()
                print("2. A cached decision (ConsentCache.check)")
                explain(
                    f"a ConsentCache in this process, listed then watching {RECS}; "
                    f"{CACHE_LOOKUPS} calls of check(customer, purpose, [one category]) cycling over "
                    f"{LOAD_CUSTOMERS} granted customers, each call timed with two perf_counter_ns "
                    f"reads (which alone cost {cached['clock_us']:.3f} µs, included)."
                )
                print(
                    f"   mean {cached['mean_us']:.2f} µs   p50 {cached['p50_us']:.2f} µs   "
                    f"p99 {cached['p99_us']:.2f} µs   p99.9 {cached['p999_us']:.1f} µs   "
                    f"max {cached['max_us']:.0f} µs"
                )
                print(
                    f"   allowed {cached['allowed']} of {CACHE_LOOKUPS}; target ≤ {TARGET_CACHE_US:.0f} µs "
                    "(mean and p99); the rare slow calls (p99.9, max) are likely this thread descheduled or "
                    "waiting for the GIL"
                )

                # 3. Revocation to cache.
                revoked = await measure_revocations(stub, metadata, cache, revoke_customers)
                print()
                print("3. Revocation to cache")
                explain(
                    f"{args.revocations} WithdrawConsent calls, one after another, each for a "
                    "customer granted earlier and with a fresh request_id; timed from just before the "
                    "call is sent until the same ConsentCache has applied the reply's revision "
                    "(wait_for_revision) and check() denies."
                )
                print(
                    f"   p50 {revoked['p50_ms']:.1f} ms   p99 {revoked['p99_ms']:.1f} ms   "
                    f"max {revoked['max_ms']:.1f} ms   over {revoked['count']} revocations "
                    f"({revoked['failures']} did not reach the cache within {REVOCATION_TIMEOUT:.0f} s)"
                )
                print(
                    f"   of which the WithdrawConsent call itself: p50 {revoked['rpc_p50_ms']:.1f} ms, "
                    f"p99 {revoked['rpc_p99_ms']:.1f} ms; the cache had the change before the reply "
                    f"arrived in {revoked['already_applied']} of {args.revocations}"
                )
        finally:
            if cache is not None:
                await cache.stop()
            exit_code = server.terminate()
            if exit_code != 0:
                # Leave out the access log, keep what explains the exit (faulthandler's stacks).
                tail = [line for line in server.lines if '"event": "rpc"' not in line][-40:]
                print(f"\nconsent service exited with {exit_code} on SIGTERM; its last log lines:")
                print("".join(tail), end="")
                if args.only:  # the figures below are not measured: fail here
                    sys.exit(1)

    revocation_ok = revoked["failures"] == 0 and revoked["p99_ms"] <= TARGET_REVOCATION_P99_MS
    rows = [
        ("health Check throughput (floor)", f"{health['per_second']:.0f} calls/s", "—", ""),
        ("health Check p50 / p99", f"{health['p50_ms']:.2f} / {health['p99_ms']:.2f} ms", "—", ""),
        ("CheckConsent throughput", f"{check['per_second']:.0f} calls/s", "—", ""),
        ("CheckConsent p50 / p99", f"{check['p50_ms']:.2f} / {check['p99_ms']:.2f} ms", "—", ""),
        (
            "CheckConsent / floor",
            f"{share:.1f} %",
            f"≥ {TARGET_CHECK_SHARE:.0f} %",
            verdict(share >= TARGET_CHECK_SHARE),
        ),
        (
            "ConsentCache.check mean",
            f"{cached['mean_us']:.2f} µs",
            f"≤ {TARGET_CACHE_US:.0f} µs",
            verdict(cached["mean_us"] <= TARGET_CACHE_US),
        ),
        (
            "ConsentCache.check p99",
            f"{cached['p99_us']:.2f} µs",
            f"≤ {TARGET_CACHE_US:.0f} µs",
            verdict(cached["p99_us"] <= TARGET_CACHE_US),
        ),
        ("revocation → cache p50", f"{revoked['p50_ms']:.1f} ms", "—", ""),
        (
            "revocation → cache p99",
            f"{revoked['p99_ms']:.1f} ms",
            f"≤ {TARGET_REVOCATION_P99_MS:.0f} ms",
            verdict(revocation_ok),
        ),
    ]
    widths = [max(len(row[i]) for row in [("figure", "value", "target", "result"), *rows]) for i in range(4)]
    print()
    print("Summary (informational: a MISS does not change the exit code)")
    for row in [("figure", "value", "target", "result"), *rows]:
        print("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    if exit_code != 0:
        print(f"\nFAILED: the consent service crashed (exit code {exit_code}), see above")
        sys.exit(1)


def main() -> None:
    if "--client" in sys.argv[1:]:
        run_client(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-pin", action="store_true", help="do not pin server and client to cores")
    parser.add_argument("--calls", type=int, default=CALLS, help="measured calls per kind")
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY, help="unary calls in flight")
    parser.add_argument("--revocations", type=int, default=REVOCATIONS)
    parser.add_argument(
        "--only",
        choices=("health", "check"),
        help="only this kind's rounds (no share, no cache or revocation figures): for profiling",
    )
    args = parser.parse_args()
    asyncio.run(bench(args))


if __name__ == "__main__":
    main()
