"""Consent benchmark: the gRPC floor, CheckConsent against it, cached decisions, revocations.

Run by `make bench` as `.venv/bin/python bench/consent_bench.py`. It starts a real consent
service process (SQLite in a temporary data directory, port 0) and prints three figures,
each with how it was measured, then a summary table against the targets. The targets are
informational: the exit code is 0 unless something crashed (the bench itself, or the
consent service exiting non-zero on SIGTERM, whose last log lines are then printed).

1. The gRPC floor and CheckConsent: h2load (bench/measure.py) keeps 256 pre-encoded calls
   in flight, health Check and CheckConsent in alternating rounds in the same run; every
   call is checked as answered OK. On a machine with two or more cores the server is
   pinned to one core and h2load to the other, so the server, not the generator, is the
   limit. Printed per kind: the median and the range of the rounds' calls/s, and of
   CheckConsent's share of the floor of the same round.
2. A cached decision: ConsentCache.check in this process, each call timed on its own.
3. Revocation to cache: WithdrawConsent, then the time until this process's ConsentCache
   (list-then-watch on the server) has applied that revision and denies.

Options: --no-pin leaves CPU placement to the scheduler; --rounds, --round-seconds,
--h2-connections, --h2-streams, --revocations change the sizes; --only check (or health) runs
only that kind's rounds (no share of the floor, no figures 2 and 3), to profile the server
on that load alone (py-spy or perf on the printed pid).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from measure import (
    BenchFailure,
    CallKind,
    Generator,
    Spread,
    add_generator_arguments,
    cpu_split,
    describe_rounds,
    health_kind,
    load_average,
    percentile,
    ratios,
    round_lines,
)
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from shared.consent_cache import ConsentCache
from shared.dev_tokens import ensure_dev_tokens
from shared.processes import ServiceProcess
from tests.postgres import free_port

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"

LOAD_CUSTOMERS = 1_000  # granted RECS; CheckConsent and the cache look them up
ROUNDS = 6  # alternating rounds per kind: H, C, H, C, ...
ROUND_SECONDS = 3.0  # about, per round (sized from the warm-up's rate)
CHECK_PATH = "/najimi.consent.v1.ConsentService/CheckConsent"
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


def measure_floor(
    server: ServiceProcess,
    metrics_port: int,
    token: str,
    args: argparse.Namespace,
    cores: set[int] | None,
    workdir: Path,
) -> dict[str, Any]:
    """Health Check and CheckConsent from h2load in alternating rounds; every call checked OK."""
    check_request = pb.CheckConsentRequest(
        customer_id=customer_ids("c", 1)[0], purpose=RECS, data_categories=[PURCHASES]
    )
    metadata = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(server.address) as channel:
        consent_stub = pb_grpc.ConsentServiceStub(channel)

        def check_probe() -> bytes:
            reply = consent_stub.CheckConsent(check_request, metadata=metadata, timeout=10)
            if not reply.allowed:
                raise BenchFailure(f"CheckConsent of a granted customer was not allowed: {reply}")
            return reply.SerializeToString()

        kinds = {
            "health": health_kind(channel),
            "check": CallKind(
                "check",
                CHECK_PATH,
                check_request.SerializeToString(),
                token,
                ("consent", "CheckConsent"),
                check_probe,
            ),
        }
        generator = Generator.from_args(
            args, server.address, server.process.pid, metrics_port, cores, workdir
        )
        rounds = generator.alternating_rounds(
            [kinds[name] for name in (args.only or "health,check").split(",")],
            args.rounds,
            args.round_seconds,
        )
    return {"rounds": rounds, "generator": generator.describe()}


def start_server(
    data_dir: Path, tokens: dict[str, str], cores: set[int] | None, metrics_port: int
) -> ServiceProcess:
    env = {
        "NAJIMI_DATA_DIR": str(data_dir),
        "NAJIMI_DATABASE_URL": f"sqlite:///{data_dir / 'consent.db'}",
        "NAJIMI_PORT": "0",
        # The bench reads the per-RPC counts by code there, to check every call was OK.
        "NAJIMI_METRICS_PORT": str(metrics_port),
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
        metrics_port = free_port()
        server = start_server(data_dir, tokens, split[0] if split else None, metrics_port)
        print(f"consent service on {server.address} (pid {server.process.pid}), SQLite in {data_dir}")
        print(
            f"  started and SERVING in {time.perf_counter() - started:.1f} s; metrics on port {metrics_port}"
        )
        if split:
            print(
                f"  server pinned to CPU {sorted(split[0])}; h2load, this process and the rest to "
                f"CPU {sorted(split[1])} (taskset), so that the server is the limit"
            )
        else:
            print("  no CPU pinning (fewer than two cores, or --no-pin)")
        print(f"  {load_average()} before the run")
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

                # 1. The floor and CheckConsent, from h2load.
                lines_before = len(server.lines)
                load = await asyncio.to_thread(
                    measure_floor,
                    server,
                    metrics_port,
                    storefront,
                    args,
                    split[1] if split else None,
                    data_dir,
                )
                rounds = load["rounds"]
                if args.only:
                    print(f"\n{args.only} only: {round_lines(rounds[args.only], None)}")
                    return
                lines_logged = len(server.lines) - lines_before
                shares = Spread.of([100 * r for r in ratios(rounds, "check", "health")])
                floor_rates = Spread.of([r.per_second for r in rounds["health"]])
                check_rates = Spread.of([r.per_second for r in rounds["check"]])
                print()
                print("1. gRPC floor vs CheckConsent")
                explain(
                    f"{load['generator']}. {describe_rounds(rounds, args.round_seconds)}. Calls/s = calls / "
                    "first start to last end of the round (h2load's log); latency = h2load's, per call. "
                    "Health Check (service '', no token) is the floor: the same server, not wrapped by the "
                    "RPC interceptor. CheckConsent (the storefront's bearer token) asks about one granted "
                    "customer, one data category (the decision is a lookup in memory, whichever customer). "
                    "Share = CheckConsent's calls/s over the floor's of the same round. Server CPU is the "
                    "server process's utime+stime (/proc); h2load's from its rusage."
                )
                print(f"   health Check  {round_lines(rounds['health'], None)}")
                print(f"   CheckConsent  {round_lines(rounds['check'], rounds['health'])}")
                print(
                    f"   the server wrote {lines_logged} log lines to stderr during the load "
                    "(started with NAJIMI_ACCESS_LOG=false)"
                )
                print(
                    f"   CheckConsent throughput = {shares.text('.1f', ' %')} of the floor "
                    f"(target ≥ {TARGET_CHECK_SHARE:.0f} %)"
                )
                print(f"   {load_average()} after the rounds")

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
        ("health Check (floor), median", f"{floor_rates.median:,.0f} calls/s", "—", ""),
        ("CheckConsent, median", f"{check_rates.median:,.0f} calls/s", "—", ""),
        (
            "CheckConsent / floor, median",
            f"{shares.median:.1f} % ({shares.low:.1f}-{shares.high:.1f})",
            f"≥ {TARGET_CHECK_SHARE:.0f} %",
            verdict(shares.median >= TARGET_CHECK_SHARE),
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
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server and h2load to cores")
    add_generator_arguments(parser, ROUNDS, ROUND_SECONDS)
    parser.add_argument("--revocations", type=int, default=REVOCATIONS)
    parser.add_argument(
        "--only",
        choices=("health", "check"),
        help="only this kind's rounds (no share, no cache or revocation figures): for profiling",
    )
    args = parser.parse_args()
    try:
        asyncio.run(bench(args))
    except BenchFailure as failure:
        print(f"\nFAILED: {failure}")
        sys.exit(1)


if __name__ == "__main__":
    main()
