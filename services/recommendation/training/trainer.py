"""The LightFM fit (the only module that imports LightFM) and the representations it yields.

Serving never calls LightFM.predict: a row's representation is its feature row times the
feature embeddings (and biases), as LightFM's get_item_representations computes them and
RecTools' LightFMWrapperModel serves them; a score is customer · item + item bias (the
customer's bias is the same for every item, so it never changes a ranking).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from lightfm import LightFM
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

LOSSES = {
    pb.LOSS_WARP: "warp",
    pb.LOSS_BPR: "bpr",
    pb.LOSS_WARP_KOS: "warp-kos",
    pb.LOSS_LOGISTIC: "logistic",
}
SCHEDULES = {pb.LEARNING_SCHEDULE_ADAGRAD: "adagrad", pb.LEARNING_SCHEDULE_ADADELTA: "adadelta"}


def available_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def lightfm_model(parameters: pb.LightFMParameters, seed: int) -> LightFM:
    """An unfitted LightFM with the resolved hyper-parameters."""
    return LightFM(
        no_components=parameters.no_components,
        k=parameters.k,
        n=parameters.n,
        learning_schedule=SCHEDULES[parameters.learning_schedule],
        loss=LOSSES[parameters.loss],
        learning_rate=parameters.learning_rate,
        rho=parameters.rho,
        epsilon=parameters.epsilon,
        item_alpha=parameters.item_alpha,
        user_alpha=parameters.user_alpha,
        max_sampled=parameters.max_sampled,
        random_state=seed,
    )


@dataclass(frozen=True)
class Representations:
    """Float32, C-contiguous rows of features summed through a fitted model's embeddings."""

    embeddings: np.ndarray  # [rows, d]
    biases: np.ndarray  # [rows]


@dataclass(frozen=True)
class FittedModel:
    customer_feature_embeddings: np.ndarray
    customer_feature_biases: np.ndarray
    item_feature_embeddings: np.ndarray
    item_feature_biases: np.ndarray

    @classmethod
    def of(cls, model: LightFM) -> FittedModel:
        """The feature embeddings and biases of a fitted LightFM, as float32 C arrays."""
        return cls(
            np.ascontiguousarray(model.user_embeddings, dtype=np.float32),
            np.ascontiguousarray(model.user_biases, dtype=np.float32),
            np.ascontiguousarray(model.item_embeddings, dtype=np.float32),
            np.ascontiguousarray(model.item_biases, dtype=np.float32),
        )

    def customers(self, features: sp.csr_matrix) -> Representations:
        return _represent(features, self.customer_feature_embeddings, self.customer_feature_biases)

    def items(self, features: sp.csr_matrix) -> Representations:
        return _represent(features, self.item_feature_embeddings, self.item_feature_biases)


def _represent(features: sp.csr_matrix, embeddings: np.ndarray, biases: np.ndarray) -> Representations:
    return Representations(
        np.ascontiguousarray(features @ embeddings, dtype=np.float32),
        np.ascontiguousarray(features @ biases, dtype=np.float32),
    )


def fit(
    interactions: sp.coo_matrix,
    customer_features: sp.csr_matrix,
    item_features: sp.csr_matrix,
    parameters: pb.LightFMParameters,
    seed: int,
    on_epoch: Callable[[int], None] = lambda epoch: None,
) -> FittedModel:
    """Fits LightFM epoch by epoch (calling on_epoch(epochs done)), on every available core.

    `interactions` holds the pairs' weights: LightFM learns from their presence, each
    weighted by its value (sample_weight, in the same COO order)."""
    model = lightfm_model(parameters, seed)
    positives = sp.coo_matrix(
        (np.ones_like(interactions.data, dtype=np.float32), (interactions.row, interactions.col)),
        shape=interactions.shape,
    )
    weights = interactions.astype(np.float32)
    threads = available_cores()
    for epoch in range(parameters.epochs):
        model.fit_partial(
            positives,
            user_features=customer_features,
            item_features=item_features,
            sample_weight=weights,
            epochs=1,
            num_threads=threads,
        )
        on_epoch(epoch + 1)
    return FittedModel.of(model)
