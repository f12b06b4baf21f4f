"""Holding out data and measuring rankings, as EvaluationProtocol says (pure numpy).

The split is over customer-item pairs (repeated interactions are one pair, so an item is
never both trained on and held out for one customer). A ranker is a function from
customer rows to scores over every item; the model and the popularity baseline are ranked
the same way, with each customer's training items excluded from both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.training.features import InteractionPairs

Ranker = Callable[[np.ndarray], np.ndarray]  # customer rows -> float scores [rows, items]
BATCH = 512  # customers scored at once: 512 x items float32 stays small


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # bool over pairs: what the model is fitted on
    warm_test: np.ndarray  # bool over pairs: warm customers' held-out pairs
    cold_customers: np.ndarray  # int rows of the customers held out whole

    @property
    def cold_test(self) -> np.ndarray:
        return ~(self.train | self.warm_test)


def split_pairs(pairs: InteractionPairs, protocol: pb.EvaluationProtocol) -> Split:
    """Cold-start customers held out whole, then each warm customer's test_fraction."""
    rng = np.random.default_rng(protocol.random_seed)
    customers = np.unique(pairs.rows)
    cold = np.sort(
        rng.choice(customers, size=round(protocol.cold_start_fraction * len(customers)), replace=False)
    )
    train = ~np.isin(pairs.rows, cold)
    cold_set = set(cold.tolist())
    warm_test = np.zeros(len(pairs.rows), dtype=bool)
    order = np.argsort(pairs.rows, kind="stable")
    bounds = np.searchsorted(pairs.rows[order], customers)
    for start, end, customer in zip(bounds, [*bounds[1:], len(order)], customers, strict=True):
        own = order[start:end]
        if customer in cold_set or len(own) < 2:
            continue
        held = min(len(own) - 1, max(1, round(protocol.test_fraction * len(own))))
        if protocol.split_method == pb.SPLIT_METHOD_TIME:
            # Newest last (ties by pair position); the newest `held` are the future to predict.
            chosen = own[np.argsort(pairs.newest_time_us[own], kind="stable")[-held:]]
        else:
            chosen = rng.choice(own, size=held, replace=False)
        warm_test[chosen] = True
    train &= ~warm_test
    return Split(train, warm_test, cold)


def popularity_ranker(pairs: InteractionPairs, train: np.ndarray) -> Ranker:
    """Items by their interaction count in the training part, the same for everyone; ties
    go to the earlier item (a fraction below 1 added to whole counts), one list for all."""
    n_items = pairs.shape[1]
    counts = np.bincount(pairs.cols[train], minlength=n_items) + np.arange(n_items, 0, -1) / (n_items + 1)
    return lambda rows: np.broadcast_to(counts, (len(rows), len(counts)))


def ranking_metrics(
    ranker: Ranker, rows: np.ndarray, relevant: sp.csr_matrix, excluded: sp.csr_matrix, k: int
) -> pb.RankingMetrics:
    """Metrics@k of `ranker` for customer `rows`, averaged over them: `relevant` marks the
    held-out items, `excluded` the training items left out of the ranking."""
    n_items = relevant.shape[1]
    sums = np.zeros(4)
    shown = np.zeros(n_items, dtype=bool)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    for start in range(0, len(rows), BATCH):
        batch = rows[start : start + BATCH]
        scores = np.array(ranker(batch), dtype=np.float64)
        banned = excluded[batch].toarray() > 0
        wanted = relevant[batch].toarray() > 0
        scores[banned] = -np.inf
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n_items else np.arange(n_items)[None, :]
        top = np.broadcast_to(top, (len(batch), top.shape[1]))
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        top_scores = np.take_along_axis(scores, top, axis=1)
        hits = np.take_along_axis(wanted, top, axis=1) & np.isfinite(top_scores)
        shown[top[np.isfinite(top_scores)]] = True
        for i in range(len(batch)):
            n_relevant = int(wanted[i].sum())
            sums[0] += hits[i].sum() / k
            sums[1] += hits[i].sum() / n_relevant
            sums[2] += (hits[i] * discounts[: hits.shape[1]]).sum() / discounts[: min(k, n_relevant)].sum()
            sums[3] += _auc(scores[i][wanted[i]], scores[i][~wanted[i] & ~banned[i]])
    means = sums / max(1, len(rows))
    return pb.RankingMetrics(
        precision_at_k=means[0],
        recall_at_k=means[1],
        ndcg_at_k=means[2],
        auc=means[3],
        catalog_coverage=shown.sum() / n_items if len(rows) else 0.0,
    )


def _auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(a held-out item outscores a candidate the customer did not touch), ties counting half."""
    if not len(negatives):
        return 1.0
    ordered = np.sort(negatives)
    below = np.searchsorted(ordered, positives, side="left")
    tied = np.searchsorted(ordered, positives, side="right") - below
    return float(np.mean((below + 0.5 * tied) / len(ordered)))


def segment(
    model: Ranker,
    baseline: Ranker,
    pairs: InteractionPairs,
    held_out: np.ndarray,
    excluded: np.ndarray,
    k: int,
) -> pb.SegmentEvaluation:
    """The model next to the baseline on the customers with a pair in `held_out`."""
    relevant = pairs.matrix(held_out).tocsr()
    training = pairs.matrix(excluded).tocsr()
    rows = np.unique(pairs.rows[held_out])
    return pb.SegmentEvaluation(
        customer_count=len(rows),
        held_out_interaction_count=int(held_out.sum()),
        model_metrics=ranking_metrics(model, rows, relevant, training, k),
        baseline_metrics=ranking_metrics(baseline, rows, relevant, training, k),
    )


def evaluate(
    warm_model: Ranker,
    cold_model: Ranker,
    pairs: InteractionPairs,
    split: Split,
    protocol: pb.EvaluationProtocol,
) -> pb.ModelEvaluation:
    """Warm and cold-start segments, model and popularity, and the gate."""
    baseline = popularity_ranker(pairs, split.train)
    evaluation = pb.ModelEvaluation(
        protocol=protocol,
        warm=segment(warm_model, baseline, pairs, split.warm_test, split.train, protocol.k),
    )
    if len(split.cold_customers):
        # Cold-start customers have no training part: nothing of theirs is excluded.
        nothing = np.zeros(len(pairs.rows), dtype=bool)
        evaluation.cold_start.CopyFrom(
            segment(cold_model, baseline, pairs, split.cold_test, nothing, protocol.k)
        )
    baseline_precision = evaluation.warm.baseline_metrics.precision_at_k
    evaluation.required_precision_at_k = (1 + protocol.gate_margin) * baseline_precision
    evaluation.passed_gate = (
        evaluation.warm.customer_count > 0
        and evaluation.warm.model_metrics.precision_at_k >= evaluation.required_precision_at_k
    )
    return evaluation


def gate_message(evaluation: pb.ModelEvaluation) -> str:
    """The gate's verdict with its figures, for the operator."""
    k = evaluation.protocol.k
    model = evaluation.warm.model_metrics.precision_at_k
    baseline = evaluation.warm.baseline_metrics.precision_at_k
    if not evaluation.warm.customer_count:
        return "no warm customer had two interactions to hold one out: nothing to evaluate"
    verdict = "passed" if evaluation.passed_gate else "rejected"
    return (
        f"warm precision@{k} {model:.4f} vs required {evaluation.required_precision_at_k:.4f} "
        f"(popularity {baseline:.4f}, margin {evaluation.protocol.gate_margin:.0%}): {verdict}"
    )
