"""Maximal-marginal-relevance re-rank over item representations (cosine similarity).

Each next item maximises (1 - diversity) * relevance - diversity * (its highest cosine
similarity to the items already chosen); relevance is the score min-max scaled to [0, 1]
over the candidates, so the two terms are on one scale. The first item is the most
relevant one whatever the diversity.

Each step scores only the item just chosen against the pool (one matrix-vector product of
[pool, d]), so k steps cost k products, not a pool-by-pool similarity matrix: k = 100 over
10k candidates at 64 dimensions takes a few milliseconds.
"""

from __future__ import annotations

import numpy as np

from services.recommendation.serving.model import ServingModel


def rerank(model: ServingModel, rows: np.ndarray, scores: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """The k rows chosen by MMR from the candidates `rows` (best first by `scores`)."""
    rows = np.asarray(rows)
    k = min(k, len(rows))
    if diversity <= 0 or k <= 1:
        return rows[:k]
    scores = np.asarray(scores, dtype=np.float32)
    low = float(scores.min())
    span = float(scores.max()) - low or 1.0
    # value = (1 - diversity) * relevance - diversity * closest, kept as one array updated in place.
    relevance = (scores - low) * np.float32((1 - diversity) / span)
    norms = np.maximum(model.item_norms[rows], np.float32(1e-12))
    vectors = model.items[rows, :-1] / norms[:, None]
    weight = np.float32(diversity)
    closest = np.full(len(rows), -np.inf, dtype=np.float32)
    chosen = np.empty(k, dtype=np.int64)
    taken = np.zeros(len(rows), dtype=bool)
    best = 0
    for step in range(k):
        if step:
            value = relevance - weight * closest
            value[taken] = -np.inf
            best = int(np.argmax(value))
        chosen[step] = best
        taken[best] = True
        np.maximum(closest, vectors @ vectors[best], out=closest)
    return rows[chosen]
