"""Maximal-marginal-relevance re-rank over item representations (cosine similarity).

Each next item maximises (1 - diversity) * relevance - diversity * (its highest cosine
similarity to the items already chosen); relevance is the score min-max scaled to [0, 1]
over the candidates, so the two terms are on one scale.
"""

from __future__ import annotations

import numpy as np

from services.recommendation.serving.model import ServingModel


def rerank(model: ServingModel, rows: np.ndarray, scores: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """The k rows chosen by MMR from the candidates `rows` (best first by `scores`)."""
    if diversity <= 0 or len(rows) <= 1:
        return rows[:k]
    span = float(scores.max() - scores.min()) or 1.0
    relevance = (scores - scores.min()) / span
    vectors = model.items[rows, :-1] / np.maximum(model.item_norms[rows], 1e-12)[:, None]
    similarity = vectors @ vectors.T
    chosen: list[int] = [0]
    closest = similarity[0].copy()
    remaining = np.ones(len(rows), dtype=bool)
    remaining[0] = False
    while len(chosen) < min(k, len(rows)):
        value = (1 - diversity) * relevance - diversity * closest
        value[~remaining] = -np.inf
        best = int(np.argmax(value))
        chosen.append(best)
        remaining[best] = False
        closest = np.maximum(closest, similarity[best])
    return rows[np.asarray(chosen)]
