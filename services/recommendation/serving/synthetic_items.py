"""Item embeddings shaped like a trained model's, for the scoring tests and bench: items
gather around cluster centres (categories of related items), and a model artefact that
holds only them (one identity feature per item, one customer)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from services.recommendation.artefacts import ModelArtefact


@dataclass(frozen=True)
class ClusteredItems:
    embeddings: np.ndarray  # float32 [n, d]
    biases: np.ndarray  # float32 [n]
    cluster: np.ndarray  # int [n]: the centre each item gathers around
    centres: np.ndarray  # float32 [clusters, d]

    def customers(self, count: int, seed: int) -> np.ndarray:
        """Customer representations [count, d] near random centres (their tastes)."""
        rng = np.random.default_rng(seed)
        picked = self.centres[rng.integers(0, len(self.centres), count)]
        return (picked + 0.25 * rng.normal(size=picked.shape)).astype(np.float32)


def clustered_items(n: int, dimensions: int, clusters: int, seed: int = 1) -> ClusteredItems:
    rng = np.random.default_rng(seed)
    centres = (0.5 * rng.normal(size=(clusters, dimensions))).astype(np.float32)
    cluster = rng.integers(0, clusters, n)
    embeddings = np.empty((n, dimensions), dtype=np.float32)
    for start in range(0, n, 1 << 16):  # in slices: float64 noise for 1M items would be 512 MB
        part = slice(start, min(n, start + (1 << 16)))
        embeddings[part] = centres[cluster[part]] + 0.25 * rng.normal(size=(part.stop - start, dimensions))
    biases = (0.3 * rng.normal(size=n)).astype(np.float32)
    return ClusteredItems(embeddings, biases, cluster, centres)


def items_artefact(embeddings: np.ndarray, biases: np.ndarray, version: str = "v1") -> ModelArtefact:
    """An artefact holding these items (identity item features) and one customer."""
    n, dimensions = embeddings.shape
    return ModelArtefact(
        version=version,
        item_ids=[f"i{i}" for i in range(n)],
        customer_ids=["c0"],
        item_embeddings=np.asarray(embeddings, dtype=np.float32),
        item_biases=np.asarray(biases, dtype=np.float32),
        customer_embeddings=np.zeros((1, dimensions), np.float32),
        customer_biases=np.zeros(1, np.float32),
        item_feature_embeddings=np.asarray(embeddings, dtype=np.float32),
        item_feature_biases=np.asarray(biases, dtype=np.float32),
        customer_feature_embeddings=np.zeros((1, dimensions), np.float32),
        customer_feature_biases=np.zeros(1, np.float32),
        item_feature_names=[f"item:i{i}" for i in range(n)],
        customer_feature_names=["customer:c0"],
        item_features=sp.identity(n, format="csr", dtype=np.float32),
        customer_features=sp.identity(1, format="csr", dtype=np.float32),
    )
