"""Recommendation quality bench: the training pipeline next to LightFM run directly.

Run by `make bench` as `.venv/bin/python bench/recommendation_quality_bench.py`. It
generates a dataset with planted structure (services/recommendation/training/synthetic.py:
about 100k interactions, 1k customers in segments that show in their attributes, 2k items
with categories, brands, price bands and tags), then
1. trains through the pipeline (run_training: features, split, fit, evaluate against
   popularity, refit on all data), timing each phase;
2. on the same split, the same feature matrices and the same hyper-parameters, fits LightFM
   directly (LightFM.fit with sample weights) and measures it with LightFM's own
   lightfm.evaluation (precision_at_k, recall_at_k, auc_score), warm customers excluding
   their training items, cold-start customers from their attributes alone;
3. prints the service, direct LightFM and popularity side by side, and the targets: the
   service's warm precision@10 within 3 % of direct LightFM, at least 1.5x popularity,
   cold-start at least popularity, the whole run at most 30 s on 2 cores.
4. unless --no-through-rpcs: starts the suite (consent, profile, recommendation,
   replenishment) and the training worker as `make run` does, on free ports in a temporary
   data directory, loads the same dataset through the RPCs (UpsertItems, CreateCustomer,
   GrantConsent, IngestEvents; training/synthetic_loading.py), waits until the
   recommender's interaction copy holds every interaction, then times TrainModel end to
   end (queued until the model is ACTIVE: pull, features, fit, evaluate, refit, write,
   activate), with each phase's time from the model's metadata.
The targets are informational: the exit code is 0 unless the bench crashes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from lightfm import evaluation as lightfm_evaluation
from measure import load_average
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.__main__ import ConsoleEcho, start_services, start_training_worker
from services.recommendation.interactions import all_interactions
from services.recommendation.training.evaluation import split_pairs
from services.recommendation.training.features import without_identity
from services.recommendation.training.options import resolve_options
from services.recommendation.training.pipeline import build_features, run_training
from services.recommendation.training.synthetic import Shape, StaticSource, generate
from services.recommendation.training.synthetic_loading import Addresses, load
from services.recommendation.training.trainer import available_cores, lightfm_model
from shared.db import Database
from shared.dev_tokens import ensure_dev_tokens
from shared.settings import SERVICE_NAMES
from tests.postgres import free_port

K = 10


def direct_lightfm(data, options: pb.TrainingOptions) -> tuple[dict[str, dict[str, float]], float]:
    """LightFM on the pipeline's split and matrices, measured by lightfm.evaluation."""
    features = build_features(data, options)
    split = split_pairs(features.pairs, options.evaluation)
    customers = without_identity(features.customers, split.cold_customers).matrix
    items = features.items.matrix
    pairs = features.pairs
    started = time.perf_counter()
    model = lightfm_model(options.lightfm, options.evaluation.random_seed)
    train = pairs.matrix(split.train)
    model.fit(
        (train > 0).astype(np.float32),
        user_features=customers,
        item_features=items,
        sample_weight=train,
        epochs=options.lightfm.epochs,
        num_threads=available_cores(),
    )
    fit_seconds = time.perf_counter() - started
    results = {}
    for name, held_out, exclude in (
        ("warm", split.warm_test, train.tocsr()),
        ("cold", split.cold_test, None),
    ):
        test = (pairs.matrix(held_out).tocsr() > 0).astype(np.float32)
        common = {"user_features": customers, "item_features": items, "num_threads": available_cores()}
        rows = np.unique(pairs.rows[held_out])
        precision = lightfm_evaluation.precision_at_k(model, test, exclude, k=K, **common)
        recall = lightfm_evaluation.recall_at_k(model, test, exclude, k=K, **common)
        auc = lightfm_evaluation.auc_score(model, test, exclude, **common)
        results[name] = {
            "customers": len(rows),
            "precision": float(precision.mean()),
            "recall": float(recall.mean()),
            "auc": float(auc.mean()),
        }
    return results, fit_seconds


def copy_size(data_dir: Path) -> int:
    database = Database(f"sqlite:///{data_dir / 'recommendation.db'}", "recommendation")
    try:
        return len(asyncio.run(database.read(all_interactions)))
    finally:
        database.close()


def through_the_service(data, requested: pb.TrainingOptions) -> None:
    """The suite and a training worker as `make run` starts them; the dataset loaded
    through the RPCs; TrainModel timed from the call until the model is ACTIVE."""
    with tempfile.TemporaryDirectory(prefix="najimi-quality-bench-") as directory:
        data_dir = Path(directory)
        tokens = ensure_dev_tokens(data_dir)
        addresses = {name: f"127.0.0.1:{free_port()}" for name in SERVICE_NAMES}
        echo = ConsoleEcho("error", str(data_dir))  # not the development-key warnings
        children = start_services(data_dir, addresses, tokens, echo)
        worker = start_training_worker(data_dir, addresses, tokens, echo)
        try:
            started = time.perf_counter()
            seconds = asyncio.run(
                load(
                    data,
                    Addresses(addresses["consent"], addresses["profile"], addresses["recommendation"]),
                    tokens,
                    concurrency=8,
                    deadline_seconds=600,
                )
            )
            loaded = time.perf_counter() - started
            deadline = time.monotonic() + 600
            while (held := copy_size(data_dir)) < len(data.interactions):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the copy holds {held} of {len(data.interactions)} interactions")
                time.sleep(0.2)
            copied = time.perf_counter() - started
            print("\nloading through the RPCs (s):")
            for part, taken in seconds.items():
                print(f"  {part:24} {taken:7.2f}")
            print(f"  {'all loaded':24} {loaded:7.2f}   (interaction copy complete after {copied:.2f} s)")
            train(data_dir, addresses["recommendation"], tokens["admin"], requested)
        finally:
            worker.terminate()
            for child in children.values():
                child.terminate()


def train(data_dir: Path, address: str, admin_token: str, requested: pb.TrainingOptions) -> None:
    admin = (("authorization", f"Bearer {admin_token}"),)
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        started = time.perf_counter()
        queued = stub.TrainModel(
            pb.TrainModelRequest(request_id="quality-bench", options=requested), metadata=admin, timeout=30
        )
        while True:
            run = stub.GetTrainingRun(
                pb.GetTrainingRunRequest(training_run_id=queued.training_run.training_run_id),
                metadata=admin,
                timeout=30,
            ).training_run
            if run.state in (pb.TRAINING_RUN_STATE_SUCCEEDED, pb.TRAINING_RUN_STATE_FAILED):
                break
            time.sleep(0.05)
        whole = time.perf_counter() - started
        model = stub.GetModel(
            pb.GetModelRequest(model_version=queued.model.model_version), metadata=admin, timeout=30
        ).model
    if run.state != pb.TRAINING_RUN_STATE_SUCCEEDED:
        print(f"\ntraining failed: {run.failure_reason}: {run.failure_message}")
        return
    metadata = json.loads((data_dir / "models" / model.model_version / "metadata.json").read_text())
    phases = metadata["phase_seconds"]
    in_worker = run.end_time.ToMicroseconds() - run.start_time.ToMicroseconds()
    waiting = run.start_time.ToMicroseconds() - run.create_time.ToMicroseconds()
    evaluation = model.evaluation
    print(
        f"\nTrainModel through the service: model {model.model_version} "
        f"{pb.ModelStatus.Name(model.status).removeprefix('MODEL_STATUS_')}, "
        f"{model.training_data.interaction_count} interactions, "
        f"{model.training_data.customer_count} customers, {model.training_data.item_count} items"
    )
    for name, segment in (("warm", evaluation.warm), ("cold start", evaluation.cold_start)):
        print(
            f"  {name:10} p@10 {segment.model_metrics.precision_at_k:.4f} "
            f"(popularity {segment.baseline_metrics.precision_at_k:.4f}), "
            f"AUC {segment.model_metrics.auc:.4f}, {segment.customer_count} customers"
        )
    print("phases (s):")
    print(f"  {'queued (worker poll)':24} {waiting / 1e6:7.2f}")
    for phase, taken in phases.items():
        print(f"  {phase.lower().replace('_', ' '):24} {taken:7.2f}")
    rest = in_worker / 1e6 - sum(phases.values())
    print(f"  {'write, register, activate':24} {rest:7.2f}")
    print(
        f"  {'whole (call to ACTIVE)':24} {whole:7.2f}   target <= 30 s: {'met' if whole <= 30 else 'MISSED'}"
    )


def metrics(segment: dict, which: str) -> dict[str, float]:
    found = segment[which]
    return {"precision": found["precision_at_k"], "recall": found["recall_at_k"], "auc": found["auc"]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--interactions", type=int, default=100_000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--through-rpcs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also load the dataset into the running suite through the RPCs and time TrainModel",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    data = generate(Shape(customers=args.customers, items=args.items, interactions=args.interactions))
    generate_seconds = time.perf_counter() - started
    requested = pb.TrainingOptions(
        lightfm=pb.LightFMParameters(epochs=args.epochs),
        evaluation=pb.EvaluationProtocol(random_seed=args.seed),
    )
    print(
        f"dataset: {len(data.interactions)} interactions, {len(data.customers)} customers, "
        f"{len(data.items)} items; {available_cores()} cores; generated in {generate_seconds:.2f} s; "
        f"{load_average()}"
    )

    run_started = time.perf_counter()
    outcome = asyncio.run(run_training(StaticSource(data), requested, lambda progress: None))
    run_seconds = time.perf_counter() - run_started
    options = resolve_options(requested)
    options.evaluation.random_seed = args.seed
    direct, direct_fit_seconds = direct_lightfm(data, options)

    evaluation = outcome.evaluation
    rows = [
        (
            "service (pipeline)",
            metrics(evaluation["warm"], "model_metrics"),
            metrics(evaluation["cold_start"], "model_metrics"),
        ),
        ("LightFM directly", direct["warm"], direct["cold"]),
        (
            "popularity",
            metrics(evaluation["warm"], "baseline_metrics"),
            metrics(evaluation["cold_start"], "baseline_metrics"),
        ),
    ]
    print(
        f"\n{'':20} {'warm p@10':>10} {'recall@10':>10} {'AUC':>7}   {'cold p@10':>10} {'recall@10':>10} {'AUC':>7}"
    )
    for name, warm, cold in rows:
        print(
            f"{name:20} {warm['precision']:10.4f} {warm['recall']:10.4f} {warm['auc']:7.4f}   "
            f"{cold['precision']:10.4f} {cold['recall']:10.4f} {cold['auc']:7.4f}"
        )
    print(
        f"(warm: {evaluation['warm']['customer_count']} customers, "
        f"{evaluation['warm']['held_out_interaction_count']} held-out pairs; cold start: "
        f"{evaluation['cold_start']['customer_count']} customers held out whole)"
    )
    print(f"gate: {outcome.gate_message}")
    print("\nphases of the service run (s):")
    for phase, seconds in outcome.phase_seconds.items():
        print(f"  {phase:18} {seconds:7.2f}")
    print(f"  {'whole run':18} {run_seconds:7.2f}   (LightFM directly: one fit {direct_fit_seconds:.2f} s)")

    service_warm, direct_warm = rows[0][1]["precision"], rows[1][1]["precision"]
    popular_warm, popular_cold = rows[2][1]["precision"], rows[2][2]["precision"]
    targets = [
        (
            "warm p@10 within 3 % of LightFM",
            f"{service_warm / direct_warm - 1:+.1%}",
            service_warm >= 0.97 * direct_warm,
        ),
        (
            "warm p@10 >= 1.5x popularity",
            f"{service_warm / popular_warm:.2f}x",
            service_warm >= 1.5 * popular_warm,
        ),
        (
            "cold p@10 >= popularity",
            f"{rows[0][2]['precision'] / popular_cold:.2f}x",
            rows[0][2]["precision"] >= popular_cold,
        ),
        ("whole run <= 30 s", f"{run_seconds:.1f} s", run_seconds <= 30),
    ]
    print("\ntargets:")
    for name, figure, met in targets:
        print(f"  {name:34} {figure:>10}  {'met' if met else 'MISSED'}")
    if args.through_rpcs:
        through_the_service(data, requested)


if __name__ == "__main__":
    main()
