"""Exact top-k: one matrix-vector product and argpartition, under an allowed-items mask.

`allowed` is a bool array [n_items] (True: the item may be returned) or None for all.
Results are rows of the model's item arrays, best first, with their scores (the full
LightFM score minus the customer's bias, which does not change the order).
"""

from __future__ import annotations

import numpy as np

from services.recommendation.serving.model import ServingModel


def top_k(
    model: ServingModel, query: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for one query [d + 1] (model.query_of), best first, and their scores."""
    scores = model.items @ query
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
        available = int(np.count_nonzero(allowed))
    else:
        available = len(scores)
    k = min(k, available)
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    rows = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    rows = rows[np.argsort(-scores[rows], kind="stable")]
    return rows.astype(np.int64), scores[rows].astype(np.float32)


def top_k_many(
    model: ServingModel, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """top_k for many queries [m, d + 1] in one matrix product; `allowed` is [n_items]
    shared by all, or [m, n_items] per query."""
    scores = queries @ model.items.T
    rows_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    for index in range(len(queries)):
        row_allowed = allowed if allowed is None or allowed.ndim == 1 else allowed[index]
        masked = scores[index] if row_allowed is None else np.where(row_allowed, scores[index], -np.inf)
        available = len(masked) if row_allowed is None else int(np.count_nonzero(row_allowed))
        count = min(k, available)
        if count <= 0:
            rows_out.append(np.empty(0, dtype=np.int64))
            scores_out.append(np.empty(0, dtype=np.float32))
            continue
        rows = np.argpartition(-masked, count - 1)[:count] if count < len(masked) else np.arange(len(masked))
        rows = rows[np.argsort(-masked[rows], kind="stable")]
        rows_out.append(rows.astype(np.int64))
        scores_out.append(masked[rows].astype(np.float32))
    return rows_out, scores_out
