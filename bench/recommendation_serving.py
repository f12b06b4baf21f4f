"""Recommendation serving bench: the Recommend RPC against the gRPC floor at 10k items, and the
fold-in delay from IngestEvents to a changed recommendation.

Run on its own (`.venv/bin/python bench/recommendation_serving.py`) or through
bench/recommendation_bench.py (`make bench`), which calls `run()` and prints its lines.
It starts real consent, profile and recommendation processes in a temporary data
directory (SQLite), loads a 10,000-item catalog through UpsertItems, registers a
hand-made 64-dimension model of those items (tests/recommendation_models.py) in the
recommendation service's registry and activates it through ActivateModel, creates and
grants consented customers, and measures:

1. Recommend throughput and latency: h2load (bench/measure.py) keeps 256 pre-encoded
   calls in flight, health Check (the floor) and Recommend in alternating rounds in the
   same run, every call checked as answered OK. The Recommend is a known, consented
   customer's, with k 10, reasons (max_reasons 3), half the categories as a filter, five
   excluded items and exclude_purchased on. Target: at least 70 % of the floor.
2. Fold-in delay: for each of FOLD_IN_TRIALS consented customers unknown to the model (a
   cold start), one product view is ingested into profile and Recommend is called every
   POLL_SECONDS until it is personalised; the delay is from sending IngestEvents to that
   answer (the feed, the interaction copy, the serving cache, the fold-in). Target: under
   2 s.

On a machine with two or more cores the recommendation service is pinned to one core and
h2load, the other services and this process to the other.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path[:0] = [
    str(Path(__file__).resolve().parents[1]),
    str(Path(__file__).resolve().parents[1] / "shared/gen"),
]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from measure import (  # noqa: E402
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
    round_lines,
)
from najimi.consent.v1 import consent_service_pb2 as consent_pb  # noqa: E402
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc  # noqa: E402
from najimi.profile.v1 import profile_service_pb2 as profile_pb  # noqa: E402
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc  # noqa: E402
from najimi.recommendation.v1 import recommendation_service_pb2 as pb  # noqa: E402
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc  # noqa: E402
from profile_bench import start_service  # noqa: E402

from services.recommendation.registry import ModelRegistry  # noqa: E402
from shared.db import Database  # noqa: E402
from shared.dev_tokens import ensure_dev_tokens  # noqa: E402
from shared.idempotency import Idempotency  # noqa: E402
from shared.processes import ServiceProcess  # noqa: E402
from tests.postgres import free_port  # noqa: E402
from tests.recommendation_models import BROWSING, PURCHASES, artefact_of, register  # noqa: E402

ITEMS = 10_000
DIMENSIONS = 64
GROUPS = 20  # categories bench/g00 .. bench/g19
KNOWN_CUSTOMERS = 1_000  # rows of the model
FOLD_IN_TRIALS = 20
POLL_SECONDS = 0.005
FOLD_IN_DEADLINE_SECONDS = 10.0
ROUNDS = 3
ROUND_SECONDS = 2.5
TARGET_SHARE = 70.0
TARGET_FOLD_IN_SECONDS = 2.0
RECS = "personalize.recommendations"
RECOMMEND_PATH = "/najimi.recommendation.v1.RecommendationService/Recommend"


def item_id(n: int) -> str:
    return f"item-{n:05d}"


def catalog(items: int) -> list[pb.Item]:
    return [
        pb.Item(
            item_id=item_id(n),
            title=f"Item {n}",
            category_path=["bench", f"g{n % GROUPS:02d}"],
            brand=f"brand-{n % 50}",
            available=True,
        )
        for n in range(items)
    ]


async def grant(consent: consent_grpc.ConsentServiceStub, auth: Any, customer: str) -> int:
    granted = await consent.GrantConsent(
        consent_pb.GrantConsentRequest(
            request_id=f"g-{customer}",
            customer_id=customer,
            purpose=RECS,
            data_categories=[PURCHASES, BROWSING],
            notice_version=1,
            collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
            jurisdiction="DE",
        ),
        metadata=auth,
    )
    return int(granted.consent.revision)


async def set_up(
    addresses: dict[str, str], tokens: dict[str, str], data_dir: Path, items: int
) -> tuple[str, list[str]]:
    """The catalog, the model (activated), consented customers; returns the measured customer
    and the fold-in customers."""

    def auth(principal: str) -> Any:
        return (("authorization", f"Bearer {tokens[principal]}"),)

    known = [f"bench-c-{n:05d}" for n in range(KNOWN_CUSTOMERS)]
    cold = [f"bench-cold-{n:03d}-{uuid.uuid4().hex[:6]}" for n in range(FOLD_IN_TRIALS)]
    async with (
        grpc.aio.insecure_channel(addresses["consent"]) as consent_channel,
        grpc.aio.insecure_channel(addresses["profile"]) as profile_channel,
        grpc.aio.insecure_channel(addresses["recommendation"]) as rec_channel,
    ):
        consent = consent_grpc.ConsentServiceStub(consent_channel)
        profile = profile_grpc.ProfileServiceStub(profile_channel)
        stub = pb_grpc.RecommendationServiceStub(rec_channel)
        listed = catalog(items)
        for start_at in range(0, len(listed), 1000):
            await stub.UpsertItems(
                pb.UpsertItemsRequest(
                    request_id=f"items-{start_at}", items=listed[start_at : start_at + 1000]
                ),
                metadata=auth("service:catalog"),
            )
        rng = np.random.default_rng(7)
        artefact = artefact_of(
            [item_id(n) for n in range(items)],
            known,
            rng.standard_normal((items, DIMENSIONS)).astype(np.float32) * 0.3,
            rng.standard_normal((len(known), DIMENSIONS)).astype(np.float32) * 0.3,
            item_biases=rng.standard_normal(items).astype(np.float32) * 0.1,
        )
        database = Database(f"sqlite:///{data_dir / 'recommendation.db'}", "recommendation")
        try:
            version = await register(
                ModelRegistry(database, Idempotency(b"k" * 32, 168)),
                data_dir / "models",
                artefact,
                "bench-model",
            )
        finally:
            database.close()
        await stub.ActivateModel(pb.ActivateModelRequest(model_version=version), metadata=auth("admin"))
        for customer in [known[0], *cold]:
            await profile.CreateCustomer(
                profile_pb.CreateCustomerRequest(request_id=f"create-{customer}", customer_id=customer),
                metadata=auth("service:crm"),
            )
            await grant(consent, auth("admin"), customer)
        deadline = time.monotonic() + 60
        while True:  # the recommender's consent cache has the grants, and the model is loaded
            found = await stub.Recommend(
                pb.RecommendRequest(customer_id=cold[-1]), metadata=auth("service:storefront")
            )
            first = await stub.Recommend(
                pb.RecommendRequest(customer_id=known[0]), metadata=auth("service:storefront")
            )
            if (
                found.recommendations.fallback_reason == pb.FALLBACK_REASON_COLD_START
                and first.recommendations.personalized
            ):
                break
            if time.monotonic() > deadline:
                raise BenchFailure(f"the recommender did not serve the model with the grants: {first}")
            await asyncio.sleep(0.1)
    return known[0], cold


def recommend_request(customer: str) -> pb.RecommendRequest:
    return pb.RecommendRequest(
        customer_id=customer,
        options=pb.RecommendOptions(
            k=10,
            max_reasons=3,
            exclude_purchased=True,
            filter=pb.ItemFilter(
                category_prefixes=[f"bench/g{g:02d}" for g in range(0, GROUPS, 2)],
                exclude_item_ids=[item_id(n) for n in range(0, 50, 10)],
            ),
        ),
    )


async def fold_in_delays(
    addresses: dict[str, str], tokens: dict[str, str], customers: list[str]
) -> list[float]:
    """Per customer: seconds from sending one product view to a personalised Recommend."""
    storefront = (("authorization", f"Bearer {tokens['service:storefront']}"),)
    delays = []
    async with (
        grpc.aio.insecure_channel(addresses["profile"]) as profile_channel,
        grpc.aio.insecure_channel(addresses["recommendation"]) as rec_channel,
    ):
        profile = profile_grpc.ProfileServiceStub(profile_channel)
        stub = pb_grpc.RecommendationServiceStub(rec_channel)
        for n, customer in enumerate(customers):
            event = profile_pb.Event(
                event_id=f"fold-{customer}",
                customer_id=customer,
                channel=profile_pb.CHANNEL_WEB,
                event_type=profile_pb.EVENT_TYPE_PRODUCT_VIEW,
                items=[profile_pb.EventItem(item_id=item_id(n * 7), category_path=["bench", "g00"])],
            )
            event.occur_time.GetCurrentTime()
            started = time.perf_counter()
            await profile.IngestEvents(profile_pb.IngestEventsRequest(events=[event]), metadata=storefront)
            while True:
                found = await stub.Recommend(pb.RecommendRequest(customer_id=customer), metadata=storefront)
                if found.recommendations.personalized:
                    delays.append(time.perf_counter() - started)
                    break
                if time.perf_counter() - started > FOLD_IN_DEADLINE_SECONDS:
                    raise BenchFailure(
                        f"{customer}: the view was not folded in within {FOLD_IN_DEADLINE_SECONDS} s"
                    )
                await asyncio.sleep(POLL_SECONDS)
    return delays


def measure_recommend(
    server: ServiceProcess,
    metrics_port: int,
    token: str,
    customer: str,
    args: argparse.Namespace,
    split: Any,
    workdir: Path,
) -> tuple[dict[str, Any], str]:
    request = recommend_request(customer)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)

        def probe() -> bytes:
            reply = stub.Recommend(request, metadata=(("authorization", f"Bearer {token}"),), timeout=10)
            found = reply.recommendations
            if not found.personalized or len(found.items) != 10 or not found.items[0].reasons:
                raise BenchFailure(f"Recommend did not answer 10 personalised items with reasons: {found}")
            return reply.SerializeToString()

        kinds = [
            health_kind(channel),
            CallKind(
                "recommend",
                RECOMMEND_PATH,
                request.SerializeToString(),
                token,
                ("recommendation", "Recommend"),
                probe,
                same_reply=False,  # a fresh recommendation_id and time in each reply
            ),
        ]
        generator = Generator.from_args(
            args, server.address, server.process.pid, metrics_port, split[1] if split else None, workdir
        )
        rounds = generator.alternating_rounds(kinds, args.rounds, args.round_seconds)
    return rounds, generator.describe()


def run(
    rounds: int = ROUNDS,
    round_seconds: float = ROUND_SECONDS,
    items: int = ITEMS,
    pin: bool = True,
    h2_connections: int | None = None,
    h2_streams: int | None = None,
    fold_in: bool = True,
) -> list[str]:
    """Runs the bench and returns the lines to print (without the fold-in delay: fold_in False)."""
    parser = argparse.ArgumentParser()
    add_generator_arguments(parser, rounds, round_seconds)
    args = parser.parse_args([])
    if h2_connections:
        args.h2_connections = h2_connections
    if h2_streams:
        args.h2_streams = h2_streams
    split = cpu_split() if pin else None
    lines = [f"Recommendation serving ({items:,} items x {DIMENSIONS} dimensions; load {load_average()})"]
    with tempfile.TemporaryDirectory(prefix="najimi-rec-serving-") as directory:
        data_dir = Path(directory)
        tokens = ensure_dev_tokens(data_dir)
        others = split[1] if split else None
        servers: list[ServiceProcess] = []
        try:
            consent = start_service("consent", data_dir, tokens, others, {})
            servers.append(consent)
            profile = start_service(
                "profile", data_dir, tokens, others, {"NAJIMI_CONSENT_ADDRESS": consent.address}
            )
            servers.append(profile)
            metrics_port = free_port()
            recommendation = start_service(
                "recommendation",
                data_dir,
                tokens,
                split[0] if split else None,
                {
                    "NAJIMI_CONSENT_ADDRESS": consent.address,
                    "NAJIMI_PROFILE_ADDRESS": profile.address,
                    "NAJIMI_METRICS_PORT": str(metrics_port),
                },
            )
            servers.append(recommendation)
            addresses = {
                "consent": consent.address,
                "profile": profile.address,
                "recommendation": recommendation.address,
            }
            customer, cold = asyncio.run(set_up(addresses, tokens, data_dir, items))
            measured, how = measure_recommend(
                recommendation, metrics_port, tokens["service:storefront"], customer, args, split, data_dir
            )
            delays = sorted(asyncio.run(fold_in_delays(addresses, tokens, cold))) if fold_in else []
        finally:
            for server in reversed(servers):
                server.terminate()
    share = Spread.of(
        [
            100 * r.per_second / f.per_second
            for r, f in zip(measured["recommend"], measured["health"], strict=True)
        ]
    )
    lines += [
        f"  how: {how}; {describe_rounds(measured, args.round_seconds)}",
        f"  health Check (floor): {round_lines(measured['health'], None)}",
        f"  Recommend (k 10, 3 reasons, 10 of 20 categories, 5 exclusions, exclude_purchased): "
        f"{round_lines(measured['recommend'], measured['health'])}",
        f"  Recommend vs floor: median {share.median:.1f} % (range {share.low:.1f}-{share.high:.1f} %, "
        f"{share.count} rounds); target >= {TARGET_SHARE:.0f} %: {'PASS' if share.median >= TARGET_SHARE else 'MISS'}",
    ]
    if not delays:
        return lines
    lines += [
        f"  fold-in delay, IngestEvents -> personalised Recommend ({len(delays)} cold-start customers, "
        f"polled every {POLL_SECONDS * 1000:.0f} ms): p50 {1000 * percentile(delays, 0.5):.0f} ms, "
        f"p99 {1000 * percentile(delays, 0.99):.0f} ms, max {1000 * max(delays):.0f} ms, "
        f"mean {1000 * statistics.mean(delays):.0f} ms; target < {TARGET_FOLD_IN_SECONDS:.0f} s: "
        f"{'PASS' if percentile(delays, 0.99) < TARGET_FOLD_IN_SECONDS else 'MISS'}",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    add_generator_arguments(parser, ROUNDS, ROUND_SECONDS)
    parser.add_argument("--items", type=int, default=ITEMS)
    parser.add_argument("--no-pin", action="store_true", help="leave CPU placement to the scheduler")
    parser.add_argument("--no-fold-in", action="store_true", help="measure Recommend against the floor only")
    args = parser.parse_args()
    for line in run(
        args.rounds,
        args.round_seconds,
        args.items,
        not args.no_pin,
        args.h2_connections,
        args.h2_streams,
        fold_in=not args.no_fold_in,
    ):
        print(line, flush=True)


if __name__ == "__main__":
    main()
