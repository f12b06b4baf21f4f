"""One training run: pull the data, build features, fit, evaluate against popularity, refit
on all data when the gate passes, and hand back the artefact to register.

The registry (the training worker) assigns the version, writes the artefact (phase
WRITING, the last PHASE_SPANS entry) and records the outcome; this module knows nothing
of the model directory or the runs table.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Any, Protocol

import grpc
import numpy as np
from google.protobuf import json_format
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.artefacts import ModelArtefact
from services.recommendation.serving import scorer
from services.recommendation.serving.ann_index import AnnIndex
from services.recommendation.serving.model import items_matrix
from services.recommendation.training.dataset import TrainingData, used_categories
from services.recommendation.training.evaluation import Ranker, evaluate, gate_message, split_pairs
from services.recommendation.training.features import (
    FeatureMatrix,
    InteractionPairs,
    customer_metadata,
    feature_matrix,
    interaction_pairs,
    item_metadata,
    without_identity,
)
from services.recommendation.training.options import resolve_options
from services.recommendation.training.trainer import FittedModel, available_cores, fit

# Each phase's share of a whole run: (start, end) of Progress.fraction.
PHASE_SPANS = {
    "PULLING_DATA": (0.0, 0.05),
    "BUILDING_FEATURES": (0.05, 0.10),
    "FITTING": (0.10, 0.50),
    "EVALUATING": (0.50, 0.55),
    "REFITTING": (0.55, 0.95),
    "WRITING": (0.95, 1.0),
}


@dataclass
class Progress:
    phase: str  # a PHASE_SPANS key (TrainingPhase without its prefix; WRITING_ARTEFACTS is WRITING)
    fraction: float  # of the whole run, in [0, 1]
    message: str
    epochs_completed: int = 0  # of the current fit (FITTING or REFITTING)


@dataclass
class TrainingOutcome:
    artefact: ModelArtefact | None  # version left "" (the registry assigns it)
    evaluation: dict[str, Any]  # ModelEvaluation as JSON (proto field names)
    passed_gate: bool
    gate_message: str
    resolved_options: dict[str, Any]  # TrainingOptions as JSON, every default resolved
    data_cursor: str
    phase_seconds: dict[str, float] = field(default_factory=dict)


class TrainingFailed(Exception):
    """A run that cannot produce a model; reason is TrainingRun.failure_reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


class Source(Protocol):
    async def load(self) -> TrainingData: ...


@dataclass(frozen=True)
class Features:
    """A run's matrices: one customer feature matrix per fit (cold-start rows differ)."""

    items: FeatureMatrix
    customers: FeatureMatrix  # identity for every customer: the refit's
    customers_split: FeatureMatrix  # cold-start rows without identity: the split fit's
    pairs: InteractionPairs


def build_features(data: TrainingData, options: pb.TrainingOptions) -> Features:
    scheme = options.features
    attributes = list(scheme.customer_attributes)
    items = feature_matrix(
        "item",
        [i.item_id for i in data.items],
        [item_metadata(i) for i in data.items],
        scheme.identity_weight,
    )
    metadata = {cid: customer_metadata(c, attributes) for cid, c in data.customers.items()}
    # Customers profile no longer lists (erased, merged away) are left out at once.
    active = {i.customer_id for i in data.interactions if i.customer_id in metadata}
    customer_ids = sorted(cid for cid, names in metadata.items() if names or cid in active)
    pairs = interaction_pairs(
        data.interactions,
        {cid: row for row, cid in enumerate(customer_ids)},
        {iid: row for row, iid in enumerate(items.ids)},
        scheme,
    )
    rows_metadata = [metadata[cid] for cid in customer_ids]
    customers = feature_matrix("customer", customer_ids, rows_metadata, scheme.identity_weight)
    return Features(items, customers, customers, pairs)


def ranker(model: FittedModel, customers: FeatureMatrix, items: FeatureMatrix) -> Ranker:
    """Scores as serving computes them: customer · item + item bias."""
    customer = model.customers(customers.matrix)
    item = model.items(items.matrix)
    return lambda rows: customer.embeddings[rows] @ item.embeddings.T + item.biases


def artefact_of(
    model: FittedModel, features: Features, customers: FeatureMatrix, metadata: dict[str, Any]
) -> ModelArtefact:
    item = model.items(features.items.matrix)
    customer = model.customers(customers.matrix)
    return ModelArtefact(
        version="",
        item_ids=list(features.items.ids),
        customer_ids=list(customers.ids),
        item_embeddings=item.embeddings,
        item_biases=item.biases,
        customer_embeddings=customer.embeddings,
        customer_biases=customer.biases,
        item_feature_embeddings=model.item_feature_embeddings,
        item_feature_biases=model.item_feature_biases,
        customer_feature_embeddings=model.customer_feature_embeddings,
        customer_feature_biases=model.customer_feature_biases,
        item_feature_names=list(features.items.names),
        customer_feature_names=list(customers.names),
        item_features=features.items.matrix.astype(np.float32).tocsr(),
        customer_features=customers.matrix.astype(np.float32).tocsr(),
        metadata=metadata,
    )


def training_data(data: TrainingData, features: Features, options: pb.TrainingOptions) -> pb.TrainingData:
    """What the model learned from, as TrainingData (consent_revision is the registry's to set)."""
    described = pb.TrainingData(
        data_cursor=data.data_cursor,
        customer_count=len(features.customers.ids),
        item_count=len(features.items.ids),
        interaction_count=features.pairs.interaction_count,
        customer_feature_count=len(features.customers.names),
        item_feature_count=len(features.items.names),
        data_categories=used_categories(data, list(options.features.customer_attributes)),
    )
    if len(features.pairs.newest_time_us):
        described.newest_interaction_time.FromMicroseconds(int(features.pairs.newest_time_us.max()))
    return described


def as_json(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


async def run_training(
    source: Source, requested: pb.TrainingOptions, progress: Callable[[Progress], None]
) -> TrainingOutcome:
    """Runs every phase but WRITING; CPU work runs in a thread, progress is reported on the loop."""
    loop = asyncio.get_running_loop()
    options = resolve_options(requested)
    parameters, protocol = options.lightfm, options.evaluation
    seconds: dict[str, float] = {}

    def report(phase: str, done: float, message: str, epochs: int = 0) -> None:
        start, end = PHASE_SPANS[phase]
        loop.call_soon_threadsafe(progress, Progress(phase, start + (end - start) * done, message, epochs))

    @contextmanager
    def phase(name: str, message: str) -> Iterator[None]:
        report(name, 0.0, message)
        started = time.perf_counter()
        yield
        seconds[name] = round(time.perf_counter() - started, 3)

    def epochs(name: str) -> Callable[[int], None]:
        total = parameters.epochs
        return lambda done: report(name, done / total, f"epoch {done} of {total}", done)

    with phase("PULLING_DATA", "reading the interaction copy, the catalog and consented attributes"):
        try:
            data = await source.load()
        except grpc.aio.AioRpcError as error:
            raise TrainingFailed(
                "PROFILE_UNAVAILABLE",
                f"profile's ListCustomers failed: {error.code().name} {error.details()}",
            ) from error
    with phase("BUILDING_FEATURES", "building features and the split"):
        features = await asyncio.to_thread(build_features, data, options)
        split = split_pairs(features.pairs, protocol)
        if not split.warm_test.any():
            raise TrainingFailed(
                "NOT_ENOUGH_INTERACTIONS",
                f"{features.pairs.interaction_count} interactions of {len(features.customers.ids)} customers: "
                "no warm customer has two items to hold one out",
            )
        features = dataclasses.replace(
            features, customers_split=without_identity(features.customers, split.cold_customers)
        )
    with phase("FITTING", f"epoch 0 of {parameters.epochs}"):
        split_model = await asyncio.to_thread(
            fit,
            features.pairs.matrix(split.train),
            features.customers_split.matrix,
            features.items.matrix,
            parameters,
            protocol.random_seed,
            epochs("FITTING"),
        )
    with phase("EVALUATING", "ranking held-out customers' items, model and popularity"):
        model_ranker = ranker(split_model, features.customers_split, features.items)
        evaluation = await asyncio.to_thread(
            evaluate, model_ranker, model_ranker, features.pairs, split, protocol
        )
    refit = evaluation.passed_gate and protocol.refit_policy == pb.REFIT_POLICY_ALL_DATA
    evaluation.refit_on_all_data = refit
    evaluation.evaluate_time.GetCurrentTime()
    verdict = gate_message(evaluation)
    model, customers = split_model, features.customers_split
    if refit:
        with phase("REFITTING", f"epoch 0 of {parameters.epochs}"):
            model = await asyncio.to_thread(
                fit,
                features.pairs.matrix(),
                features.customers.matrix,
                features.items.matrix,
                parameters,
                protocol.random_seed,
                epochs("REFITTING"),
            )
            customers = features.customers
    metadata = {
        "options": as_json(options),
        "evaluation": as_json(evaluation),
        "gate_message": verdict,
        "training_data": as_json(training_data(data, features, options)),
        "data_cursor": data.data_cursor,
        "phase_seconds": seconds,
        "library_versions": {name: version(name) for name in ("rectools-lightfm", "numpy", "scipy")},
        "created_time": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    artefact = artefact_of(model, features, customers, metadata)
    if len(artefact.item_ids) >= scorer.ANN_MIN_ITEMS:
        # Serving asks an index from this catalog size on: built here, once, and stored with
        # the artefact, so activating the model never builds it (phase_seconds BUILDING_INDEX).
        report("WRITING", 0.0, f"building the approximate top-k index over {len(artefact.item_ids)} items")
        started = time.perf_counter()
        index = await asyncio.to_thread(AnnIndex.build, items_matrix(artefact), available_cores())
        artefact = dataclasses.replace(artefact, ann_index=index)
        seconds["BUILDING_INDEX"] = round(time.perf_counter() - started, 3)
    return TrainingOutcome(
        artefact=artefact,
        evaluation=as_json(evaluation),
        passed_gate=evaluation.passed_gate,
        gate_message=verdict,
        resolved_options=as_json(options),
        data_cursor=data.data_cursor,
        phase_seconds=seconds,
    )
