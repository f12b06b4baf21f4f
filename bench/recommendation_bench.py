"""Recommendation serving bench: the scorer against bare numpy and LightFM.predict, the
approximate index at 1M items, then the other recommendation sections.

Run by `make bench` as `.venv/bin/python bench/recommendation_bench.py`. In this process,
on synthetic clustered item embeddings (serving/synthetic_items.py: items around 1,000
centres, customers near a centre, like a trained model's), k = 10, 64 dimensions:

1. Scoring one customer over 10k, 100k and 1M items, three scorers timed call by call,
   interleaved in rounds: the service's exact scorer (serving/scorer.py top_k, no index;
   also with 30 % of the items allowed), a bare numpy matrix-vector product with
   argpartition (and the order of the k), and LightFM.predict for one user over every item
   (a LightFM holding the same embeddings; identity feature matrices built once; as many
   threads as cores) with the same argpartition. Printed: p50 and p99 per scorer, and per
   round the ratios ours/numpy and predict/ours, as the median and range over the rounds.
   Targets: ours at most 1.3x numpy at 100k, predict at least 2x ours. Then the diversity
   re-rank (MMR) of 4k and 10k candidates down to 10 and 100.
2. The approximate index at 1M items (serving/ann_index.py, faiss inverted lists, inner product):
   its build time (what training adds from the switch size on), then per filter the
   scorer's p50 and p99 through the index, recall@10 against exact scoring, the share of
   calls the index could not vouch for (answered exactly), and exact scoring's p50 beside
   it. Filters: none; 30 % of the items allowed at random (exclusions, bought items,
   unavailable ones); 30 % allowed by category (3 of 10 categories of centres: the
   customer's favourite region may be filtered out). Per round also the ratio of the
   index's p50 to exact scoring's. Target: p50 <= 1 ms at recall@10 >= 0.95 with filters on.
3. The other helpers' sections, when their modules exist (each module's run() returns the
   lines to print): SECTIONS below.

The matrix products run on one BLAS thread (--blas-threads): serving scores one request per
thread, and on a busy 2-core machine two BLAS threads spin-waiting for each other made
the numpy and service p50s vary 100-fold between rounds. LightFM.predict keeps its own
threads (as many as cores).

Options: --rounds, --sizes, --ann-items, --queries, --blas-threads; --skip scoring,ann,...
to leave out sections. The targets are informational: the exit code is 0 unless the bench crashes.
"""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse as sp
from lightfm import LightFM
from measure import Spread, load_average, percentile
from threadpoolctl import threadpool_limits

from services.recommendation.serving.ann_index import AnnIndex
from services.recommendation.serving.diversity import rerank
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.scorer import ANN_MIN_ITEMS, exact_top_k, top_k
from services.recommendation.serving.synthetic_items import ClusteredItems, clustered_items, items_artefact
from services.recommendation.training.trainer import available_cores

K = 10
DIMENSIONS = 64
CENTRES = 1_000
ROUNDS = 5
SIZES = (10_000, 100_000, 1_000_000)
ANN_ITEMS = 1_000_000
ALLOWED_SHARE = 0.3
CATEGORIES = 10
QUERIES = 200  # distinct customers, cycled
SECONDS_PER_SCORER = 1.0  # about, per round (the calls per round are sized from a warm-up)
# Sections the other recommendation benches expose (a module under bench/ with run() -> lines).
SECTIONS = ("recommendation_serving", "recommendation_quality")

TARGET_NUMPY_RATIO = 1.3  # ours / numpy at 100k items, at most
TARGET_PREDICT_RATIO = 2.0  # predict / ours, at least
TARGET_ANN_P50_MS = 1.0
TARGET_RECALL = 0.95


# Scorers -------------------------------------------------------------------------------

Scorer = Callable[[int], object]  # query number -> anything (the call is what is timed)


def numpy_scorer(items: np.ndarray, queries: np.ndarray) -> Scorer:
    def score(index: int) -> object:
        scores = items @ queries[index]
        rows = np.argpartition(-scores, K)[:K]
        return rows[np.argsort(-scores[rows])]

    return score


def service_scorer(model: ServingModel, queries: np.ndarray, allowed: np.ndarray | None = None) -> Scorer:
    return lambda index: top_k(model, queries[index], K, allowed)


def predict_scorer(clustered: ClusteredItems, customers: np.ndarray) -> Scorer:
    """LightFM.predict for one user over every item, with the same embeddings."""
    n = len(clustered.biases)
    model = LightFM(no_components=DIMENSIONS)
    model._initialize(DIMENSIONS, n, len(customers))
    model.item_embeddings = clustered.embeddings
    model.item_biases = clustered.biases
    model.user_embeddings = np.ascontiguousarray(customers, dtype=np.float32)
    model.user_biases = np.zeros(len(customers), dtype=np.float32)
    item_features = sp.identity(n, format="csr", dtype=np.float32)
    user_features = sp.identity(len(customers), format="csr", dtype=np.float32)
    item_ids = np.arange(n, dtype=np.int32)
    threads = available_cores()

    def score(index: int) -> object:
        user_ids = np.full(n, index, dtype=np.int32)
        scores = model.predict(user_ids, item_ids, item_features, user_features, num_threads=threads)
        rows = np.argpartition(-scores, K)[:K]
        return rows[np.argsort(-scores[rows])]

    return score


def timed_calls(score: Scorer, calls: int, queries: int) -> list[float]:
    """Seconds of each call, sorted."""
    clock = time.perf_counter
    latencies = []
    for call in range(calls):
        started = clock()
        score(call % queries)
        latencies.append(clock() - started)
    latencies.sort()
    return latencies


def calls_for(score: Scorer, queries: int) -> int:
    """Calls that take about SECONDS_PER_SCORER (from a warm-up of a few calls)."""
    warm = timed_calls(score, 3, queries)
    return int(max(5, min(2_000, SECONDS_PER_SCORER / max(warm[1], 1e-6))))


@dataclass
class Rounds:
    p50: list[float]
    p99: list[float]


def measure_rounds(scorers: dict[str, Scorer], rounds: int, queries: int) -> dict[str, Rounds]:
    """Each scorer's p50 and p99 (ms) per round; the scorers take turns within a round."""
    calls = {name: calls_for(score, queries) for name, score in scorers.items()}
    found = {name: Rounds([], []) for name in scorers}
    for _ in range(rounds):
        for name, score in scorers.items():
            latencies = timed_calls(score, calls[name], queries)
            found[name].p50.append(percentile(latencies, 0.50) * 1e3)
            found[name].p99.append(percentile(latencies, 0.99) * 1e3)
    return found


def ms(values: list[float]) -> str:
    return Spread.of(values).text(".3f", " ms")


def ratio(values: list[float]) -> str:
    return Spread.of(values).text(".2f", "x")


# Sections ------------------------------------------------------------------------------


def scoring_section(sizes: tuple[int, ...], rounds: int, queries: int) -> list[tuple[str, str, bool]]:
    print(
        f"\n1. scoring one customer, k={K}, {DIMENSIONS} dimensions, {rounds} rounds "
        f"(p50 and p99 per round: median (range))"
    )
    targets = []
    for n in sizes:
        clustered = clustered_items(n, DIMENSIONS, CENTRES)
        model = ServingModel.from_artefact(items_artefact(clustered.embeddings, clustered.biases))
        customers = clustered.customers(queries, seed=2)
        batch = np.stack([model.query_of(customer) for customer in customers])
        allowed = np.random.default_rng(3).random(n) < ALLOWED_SHARE
        scorers = {
            "service": service_scorer(model, batch),
            f"service, {ALLOWED_SHARE:.0%} allowed": service_scorer(model, batch, allowed),
            "numpy matvec+argpartition": numpy_scorer(model.items, batch),
            "LightFM.predict": predict_scorer(clustered, customers),
        }
        found = measure_rounds(scorers, rounds, queries)
        print(f"  {n:,} items")
        for name, figures in found.items():
            print(f"    {name:28} p50 {ms(figures.p50)}   p99 {ms(figures.p99)}")
        ours, numpy, predict = (
            found["service"].p50,
            found["numpy matvec+argpartition"].p50,
            found["LightFM.predict"].p50,
        )
        to_numpy = [a / b for a, b in zip(ours, numpy, strict=True)]
        from_predict = [b / a for a, b in zip(ours, predict, strict=True)]
        print(f"    ours/numpy p50 {ratio(to_numpy)}   predict/ours p50 {ratio(from_predict)}")
        if n == 100_000:
            median = Spread.of(to_numpy).median
            targets.append(
                (
                    f"ours <= {TARGET_NUMPY_RATIO}x numpy at 100k",
                    f"{median:.2f}x",
                    median <= TARGET_NUMPY_RATIO,
                )
            )
        median = Spread.of(from_predict).median
        targets.append(
            (
                f"predict >= {TARGET_PREDICT_RATIO:.0f}x ours at {n:,}",
                f"{median:.1f}x",
                median >= TARGET_PREDICT_RATIO,
            )
        )
        del model, scorers
    return targets


def diversity_section(rounds: int) -> None:
    """MMR re-rank (diversity 0.3) of the best `pool` items of 100k down to k."""
    clustered = clustered_items(100_000, DIMENSIONS, CENTRES)
    model = ServingModel.from_artefact(items_artefact(clustered.embeddings, clustered.biases))
    query = model.query_of(clustered.customers(1, seed=6)[0])
    print(
        f"\n   diversity re-rank (MMR, diversity 0.3) over the best candidates of 100,000 items, {rounds} rounds"
    )
    for pool in (4_000, 10_000):
        rows, scores = exact_top_k(model, query, pool)
        for k in (10, 100):
            p50s = [
                percentile(
                    timed_calls(
                        lambda _, rows=rows, scores=scores, k=k: rerank(model, rows, scores, k, 0.3), 20, 1
                    ),
                    0.5,
                )
                * 1e3
                for _ in range(rounds)
            ]
            print(f"    {pool:,} candidates to {k:3}: p50 {ms(p50s)}")


def ann_masks(clustered: ClusteredItems, count: int) -> dict[str, list[np.ndarray | None]]:
    rng = np.random.default_rng(4)
    n = len(clustered.cluster)
    category = clustered.cluster % CATEGORIES
    picked = max(1, round(ALLOWED_SHARE * CATEGORIES))
    return {
        "no filter": [None] * count,
        f"{ALLOWED_SHARE:.0%} allowed at random": [rng.random(n) < ALLOWED_SHARE for _ in range(count)],
        f"{ALLOWED_SHARE:.0%} allowed by category": [
            np.isin(category, rng.choice(CATEGORIES, picked, replace=False)) for _ in range(count)
        ],
    }


def ann_section(n: int, rounds: int, queries: int) -> list[tuple[str, str, bool]]:
    clustered = clustered_items(n, DIMENSIONS, CENTRES)
    model = ServingModel.from_artefact(items_artefact(clustered.embeddings, clustered.biases))
    threads = available_cores()
    started = time.perf_counter()
    index = AnnIndex.build(model.items, threads)
    build_seconds = time.perf_counter() - started
    faiss.omp_set_num_threads(1)  # serving: one search per request thread
    model = ServingModel.from_artefact(model.artefact, ann=index)
    print(
        f"\n2. approximate index over {n:,} items x {DIMENSIONS} dimensions (faiss inverted lists, inner product, seeded from an exact sample; "
        f"serving switches to it from {ANN_MIN_ITEMS:,} items): built in {build_seconds:.1f} s on {threads} cores"
    )
    batch = np.stack([model.query_of(customer) for customer in clustered.customers(queries, seed=5)])
    exact = {}
    targets = []
    for name, masks in ann_masks(clustered, queries).items():
        truth = [exact_top_k(model, batch[i], K, masks[i])[0] for i in range(queries)]
        unvouched = sum(index.search(model.items, batch[i], K, masks[i]) is None for i in range(queries))
        recall = sum(
            len(set(top_k(model, batch[i], K, masks[i], ann_min_items=1)[0]) & set(truth[i]))
            for i in range(queries)
        ) / (K * queries)
        found = measure_rounds(
            {
                "index": lambda i, masks=masks: top_k(model, batch[i], K, masks[i], ann_min_items=1),
                "exact": lambda i, masks=masks: exact_top_k(model, batch[i], K, masks[i]),
            },
            rounds,
            queries,
        )
        exact[name] = found["exact"].p50
        to_exact = [a / b for a, b in zip(found["index"].p50, found["exact"].p50, strict=True)]
        print(
            f"  {name:24} p50 {ms(found['index'].p50)}   p99 {ms(found['index'].p99)}   "
            f"recall@{K} {recall:.3f}   answered exactly {unvouched / queries:.0%}   "
            f"(exact p50 {ms(found['exact'].p50)}; index/exact p50 {Spread.of(to_exact).text('.3f', 'x')})"
        )
        if name != "no filter":
            p50 = Spread.of(found["index"].p50).median
            met = p50 <= TARGET_ANN_P50_MS and recall >= TARGET_RECALL
            targets.append(
                (
                    f"{n // 1_000_000}M, {name}: p50 <= 1 ms, recall >= 0.95",
                    f"{p50:.3f} ms, {recall:.3f}",
                    met,
                )
            )
    return targets


def other_sections() -> None:
    for number, name in enumerate(SECTIONS, start=3):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            print(f"\n{number}. {name}: not there yet, skipped")
            continue
        run = getattr(module, "run", None)
        if run is None:
            print(f"\n{number}. {name}: has no run() yet, skipped (make bench runs it on its own)")
            continue
        print(f"\n{number}. {name}")
        for line in run():
            print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--sizes", type=lambda text: tuple(int(n) for n in text.split(",")), default=SIZES)
    parser.add_argument("--ann-items", type=int, default=ANN_ITEMS)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--skip", default="", help="sections to leave out: scoring,ann,others")
    args = parser.parse_args()
    skip = set(args.skip.split(",")) - {""}
    print(
        f"recommendation scoring bench: {available_cores()} cores, {args.blas_threads} BLAS thread(s); "
        f"{load_average()}"
    )
    targets = []
    with threadpool_limits(limits=args.blas_threads, user_api="blas"):
        if "scoring" not in skip:
            targets += scoring_section(args.sizes, args.rounds, args.queries)
            diversity_section(args.rounds)
        if "ann" not in skip:
            targets += ann_section(args.ann_items, args.rounds, args.queries)
    if targets:
        print("\ntargets (medians over the rounds):")
        for name, figure, met in targets:
            print(f"  {name:52} {figure:>16}  {'met' if met else 'MISSED'}")
    if "others" not in skip:
        other_sections()


if __name__ == "__main__":
    main()
