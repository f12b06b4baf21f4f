"""Top-k under an allowed-items mask: exact (one matrix-vector product), or approximate
through the model's ANN index for large catalogs (ann_index.py).

`allowed` is a bool array [n_items] (True: the item may be returned) or None for all.
Results are rows of the model's item arrays, best first (ties: the lower row first), with
their scores (the full LightFM score minus the customer's bias, which does not change the
order).

Exact selection does not argpartition the whole score array: a strided sample of the
allowed scores gives a threshold that about CANDIDATES allowed items pass, one vectorised
comparison finds them, and only those are ordered; when too few pass (an unlucky sample),
the threshold is the exact k-th best allowed score. The scores go into a per-thread
scratch buffer, so a request allocates nothing the size of the catalog.

A filter that keeps part of the catalog (a few categories, say) need not cost the whole
product: top_k_among scores the filter's Candidates (its rows and a contiguous copy of
their vectors, which the serving catalog keeps per filter), less a few blocked rows
(exclusions, purchases). Each score is the same dot product of the same row either way,
so scores and ranking do not change (ties still go to the lower row: the candidates' rows
are in ascending order).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.recommendation.serving.model import ServingModel

# At and above this many items, top_k asks the model's ANN index when it has one (and the
# mask leaves enough items for the index to find k of them); below, exact scoring is
# about as fast. Chosen by bench/recommendation_bench.py (README "Scoring and large catalogs").
ANN_MIN_ITEMS = 200_000
# Below this many scores, the exact k-th best is found directly (no sample).
SAMPLED_FROM = 2_048
# The sample's threshold aims at about this many candidates per k, and at least
# sqrt(SAMPLE_RANK x allowed): the sample and the candidates it lets through are then
# about the same size, which measured fastest from 5,000 to 1M scores (k 10; against a
# fixed 1,024: 2.2x faster at 5,000, level at 100k, 1.3x faster at 1M). SAMPLE_RANK
# sampled scores lie above the threshold (so the count passing rarely falls under k).
CANDIDATES_PER_K = 8
SAMPLE_RANK = 32
# A mask allowing at most 1 item in this many: score only the allowed rows (gathered).
GATHER_BELOW = 16
# top_k_many scores a block of queries at a time: at most this many floats of scores.
BLOCK_FLOATS = 1 << 22

_scratch = threading.local()

EMPTY_ROWS = np.empty(0, dtype=np.int64)
EMPTY_SCORES = np.empty(0, dtype=np.float32)


def _buffer(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A per-thread float32 scratch array of `shape` (reused across calls; never returned)."""
    size = math.prod(shape)  # not np.prod: a few microseconds a request
    held = getattr(_scratch, name, None)
    if held is None or held.size < size:
        held = np.empty(size, dtype=np.float32)
        setattr(_scratch, name, held)
    return held[:size].reshape(shape)


def _largest(values: np.ndarray, rank: int) -> float:
    """The rank-th largest of `values` (not modified; np.partition less its Python wrapper)."""
    part = values.copy()
    at = len(part) - rank
    part.partition(at)
    return float(part[at])


def _rows_at_least(scores: np.ndarray, threshold: float, allowed: np.ndarray | None) -> np.ndarray:
    passing = scores >= threshold
    if allowed is not None:
        passing &= allowed
    return passing.nonzero()[0]  # np.flatnonzero, less its Python wrapper


def _sampled_threshold(
    scores: np.ndarray, k: int, allowed: np.ndarray | None, available: int
) -> float | None:
    """A score that about max(CANDIDATES_PER_K * k, sqrt(SAMPLE_RANK * available)) allowed
    items reach, from a strided sample; None when the catalog or the allowed set is too
    small to sample."""
    wanted = max(CANDIDATES_PER_K * k, math.isqrt(SAMPLE_RANK * available))
    if len(scores) < SAMPLED_FROM or available < 4 * wanted:
        return None
    stride = max(1, wanted // SAMPLE_RANK)
    sample = scores[::stride]
    if allowed is not None:
        sample = sample[allowed[::stride]]
    rank = min(len(sample), round(wanted * len(sample) / available))
    if rank < SAMPLE_RANK // 2:
        return None
    return _largest(sample, rank)


def _exact_threshold(scores: np.ndarray, k: int, allowed: np.ndarray | None) -> float:
    """The k-th best allowed score (k at most the number allowed)."""
    values = scores if allowed is None else scores[allowed]
    return _largest(values, k)


def _ordered(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `rows` (ascending) by score, best first, ties by the lower row."""
    values = scores[rows]
    if len(rows) > 4 * k:
        kth = _largest(values, k)
        kept = values >= kth  # the k best and any ties with the k-th (the order below settles them)
        rows, values = rows[kept], values[kept]
    order = np.lexsort((rows, -values))[:k]
    return rows[order].astype(np.int64, copy=False), values[order].astype(np.float32, copy=False)


def best_of(scores: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The k best allowed rows of a score array [n], best first (ties by the lower row), and
    their scores (copied: `scores` may be a scratch buffer)."""
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    available = len(scores) if allowed is None else int(np.count_nonzero(allowed))
    k = min(k, available)
    if k <= 0:
        return EMPTY_ROWS, EMPTY_SCORES
    if available == len(scores):
        allowed = None
    threshold = _sampled_threshold(scores, k, allowed, available)
    rows = EMPTY_ROWS if threshold is None else _rows_at_least(scores, threshold, allowed)
    if len(rows) < k:
        rows = _rows_at_least(scores, _exact_threshold(scores, k, allowed), allowed)
    return _ordered(scores, rows, k)


def top_k_among(
    candidates: Candidates, query: np.ndarray, k: int, blocked: Sequence[int] = ()
) -> tuple[np.ndarray, np.ndarray]:
    """exact_top_k over the candidates but the `blocked` rows (distinct model rows; those not
    among the candidates are ignored): the blocked score -inf in the scratch scores, so the
    selection needs no mask of the catalog's size. An allowed row scoring -inf itself would
    tie with them: then a mask decides."""
    scores = np.matmul(
        candidates.items, np.asarray(query, dtype=np.float32), out=_buffer("scores", (len(candidates.rows),))
    )
    at = EMPTY_ROWS
    if blocked and len(scores):
        wanted = np.fromiter(blocked, dtype=np.int64, count=len(blocked))
        at = candidates.rows.searchsorted(wanted)
        at = at[candidates.rows.take(at, mode="clip") == wanted]
        scores[at] = -np.inf
    found, values = best_of(scores, min(k, len(scores) - len(at)))
    if len(values) and values[-1] == -np.inf:
        allowed = np.ones(len(scores), dtype=bool)
        allowed[at] = False
        found, values = best_of(scores, k, allowed)
    return candidates.rows[found], values


def _few_allowed(allowed: np.ndarray) -> bool:
    return int(np.count_nonzero(allowed)) * GATHER_BELOW <= len(allowed)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Some of a model's item rows (ascending) and their rows of model.items, copied into one
    contiguous matrix: scoring them costs what they hold, not what the catalog holds."""

    rows: np.ndarray  # int64 [m], ascending
    items: np.ndarray  # float32 C-contiguous [m, d + 1]

    @classmethod
    def of(cls, model: ServingModel, mask: np.ndarray) -> Candidates:
        rows = np.flatnonzero(mask)
        return cls(rows, np.ascontiguousarray(model.items[rows]))


def scored_exactly(model: ServingModel, ann_min_items: int = ANN_MIN_ITEMS) -> bool:
    """Whether top_k scores this model's items one by one (no index): what Candidates serve."""
    return model.ann is None or len(model.items) < ann_min_items


def exact_top_k(
    model: ServingModel, query: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """top_k by scoring every allowed item (no index): the whole catalog in one product, or
    only the allowed rows when the mask leaves few (at most 1 in GATHER_BELOW)."""
    query = np.asarray(query, dtype=np.float32)
    if allowed is not None and _few_allowed(allowed):
        rows = np.flatnonzero(allowed)
        best, scores = best_of(model.items[rows] @ query, k)
        return rows[best].astype(np.int64, copy=False), scores
    scores = np.matmul(model.items, query, out=_buffer("scores", (len(model.items),)))
    return best_of(scores, k, allowed)


def top_k(
    model: ServingModel,
    query: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    *,
    ann_min_items: int = ANN_MIN_ITEMS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best rows for one query [d + 1] (model.query_of), best first, and their scores.

    Through the model's ANN index when it has one and holds at least `ann_min_items` items
    (approximate: recall@10 about 0.95 or better) unless the mask allows few items (those are
    scored exactly, and faster); exact otherwise, and whenever the index cannot vouch for
    its answer."""
    allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
    available = len(model.items) if allowed is None else int(np.count_nonzero(allowed))
    broad = available * GATHER_BELOW > len(model.items)
    if not scored_exactly(model, ann_min_items) and broad:
        found = _indexed_top_k(model, query, k, allowed, available)
        if found is not None:
            return found
    return exact_top_k(model, query, k, allowed)


def _indexed_top_k(
    model: ServingModel, query: np.ndarray, k: int, allowed: np.ndarray | None, available: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """top_k through the index over the trained rows, and the rows appended after them (items
    added since training, new_items.py) scored exactly beside it; None when the index
    cannot vouch for its answer."""
    assert model.ann is not None
    indexed = model.ann.size
    if indexed == len(model.items):
        return model.ann.search(model.items, query, k, allowed, available)
    if indexed > len(model.items):
        return None
    head = None if allowed is None else allowed[:indexed]
    found = model.ann.search(model.items[:indexed], query, k, head)
    if found is None:
        return None
    tail_rows, tail_scores = best_of(
        model.items[indexed:] @ np.asarray(query, dtype=np.float32),
        k,
        None if allowed is None else allowed[indexed:],
    )
    rows = np.concatenate([found[0], tail_rows + indexed])
    scores = np.concatenate([found[1], tail_scores])
    order = np.lexsort((rows, -scores))[:k]
    return rows[order], scores[order]


def top_k_many(
    model: ServingModel, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Exact top_k for many queries [m, d + 1], scored a block of queries at a time by one
    matrix-matrix product each; `allowed` is [n_items] shared by all, or [m, n_items] per query."""
    queries = np.asarray(queries, dtype=np.float32)
    items = model.items
    block = max(1, min(len(queries), BLOCK_FLOATS // max(1, len(items))))
    rows_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    for start in range(0, len(queries), block):
        part = queries[start : start + block]
        scores = np.matmul(part, items.T, out=_buffer("block", (len(part), len(items))))
        for offset in range(len(part)):
            mask = allowed if allowed is None or allowed.ndim == 1 else allowed[start + offset]
            rows, values = best_of(scores[offset], k, mask)
            rows_out.append(rows)
            scores_out.append(values)
    return rows_out, scores_out
