"""Evaluation with known answers: the split follows the protocol, metrics@k, AUC and
coverage are what a hand count gives, and the gate compares warm precision@k with
popularity's times (1 + margin)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.training.evaluation import (
    evaluate,
    gate_message,
    popularity_ranker,
    ranking_metrics,
    split_pairs,
)
from services.recommendation.training.features import InteractionPairs
from services.recommendation.training.options import resolve_options


def pairs_of(rows, cols, times=None, shape=None) -> InteractionPairs:
    rows, cols = np.asarray(rows, dtype=np.int32), np.asarray(cols, dtype=np.int32)
    return InteractionPairs(
        rows,
        cols,
        np.ones(len(rows), dtype=np.float32),
        np.asarray(times if times is not None else np.zeros(len(rows)), dtype=np.int64),
        shape or (int(rows.max()) + 1, int(cols.max()) + 1),
        len(rows),
    )


def marks(shape, cells) -> sp.csr_matrix:
    matrix = np.zeros(shape, dtype=np.float32)
    for row, col in cells:
        matrix[row, col] = 1
    return sp.csr_matrix(matrix)


def test_metrics_match_a_hand_count():
    scores = np.array([[5, 4, 3, 2, 1], [1, 2, 3, 4, 5]], dtype=np.float32)
    metrics = ranking_metrics(
        lambda rows: scores[rows],
        np.array([0, 1]),
        relevant=marks((2, 5), [(0, 3), (1, 4), (1, 0)]),
        excluded=marks((2, 5), [(0, 1)]),
        k=2,
    )
    # Customer 0: top [0, 2] (1 excluded), no hit; its item 3 beats 1 of 3 candidates.
    # Customer 1: top [4, 3], one hit of two at rank 1; items 4 and 0 beat 3 and 0 of 3.
    assert metrics.precision_at_k == pytest.approx(0.25)
    assert metrics.recall_at_k == pytest.approx(0.25)
    assert metrics.ndcg_at_k == pytest.approx((1 / (1 + 1 / np.log2(3))) / 2)
    assert metrics.auc == pytest.approx((1 / 3 + 0.5) / 2)
    assert metrics.catalog_coverage == pytest.approx(4 / 5)


def test_ties_count_half_in_the_auc_and_a_perfect_ranker_scores_one():
    tied = ranking_metrics(
        lambda rows: np.zeros((len(rows), 4)), np.array([0]), marks((1, 4), [(0, 2)]), marks((1, 4), []), k=1
    )
    assert tied.auc == pytest.approx(0.5)
    perfect = ranking_metrics(
        lambda rows: np.array([[0, 0, 9, 8]]),
        np.array([0]),
        marks((1, 4), [(0, 2), (0, 3)]),
        marks((1, 4), []),
        k=2,
    )
    assert (perfect.precision_at_k, perfect.recall_at_k, perfect.ndcg_at_k, perfect.auc) == (1, 1, 1, 1)


def protocol(**fields) -> pb.EvaluationProtocol:
    return resolve_options(
        pb.TrainingOptions(evaluation=pb.EvaluationProtocol(random_seed=7, **fields))
    ).evaluation


def test_random_split_holds_out_cold_customers_whole_and_a_fraction_of_each_warm_one():
    rng = np.random.default_rng(1)
    cells = sorted({(c, int(i)) for c in range(100) for i in rng.choice(50, size=10, replace=False)})
    pairs = pairs_of([c for c, _ in cells], [i for _, i in cells], shape=(100, 50))
    split = split_pairs(pairs, protocol(test_fraction=0.3, cold_start_fraction=0.2))
    assert len(split.cold_customers) == 20
    cold = np.isin(pairs.rows, split.cold_customers)
    assert not (split.train & cold).any() and not (split.warm_test & cold).any()
    assert (split.cold_test == cold).all()
    for customer in set(range(100)) - set(split.cold_customers.tolist()):
        own = pairs.rows == customer
        assert (split.warm_test & own).sum() == 3 and (split.train & own).sum() == 7
    again = split_pairs(pairs, protocol(test_fraction=0.3, cold_start_fraction=0.2))
    assert (again.warm_test == split.warm_test).all()  # the seed decides


def test_time_split_holds_out_each_customers_newest_and_never_a_lone_interaction():
    pairs = pairs_of([0, 0, 0, 0, 0, 1, 2, 2], [0, 1, 2, 3, 4, 0, 1, 2], times=[50, 10, 40, 20, 30, 5, 2, 1])
    split = split_pairs(
        pairs, protocol(split_method=pb.SPLIT_METHOD_TIME, test_fraction=0.4, cold_start_fraction=0)
    )
    assert len(split.cold_customers) == 0
    assert split.warm_test.tolist() == [True, False, True, False, False, False, True, False]


def test_gate_compares_warm_precision_with_popularity_times_the_margin():
    # Items 0 and 1 are popular; each customer's held-out item is their own "niche" item.
    rows = [c for c in range(6) for _ in range(3)]
    cols = [item for c in range(6) for item in (0, 1, 2 + c)]
    pairs = pairs_of(rows, cols, times=[t for _ in range(6) for t in (1, 2, 3)], shape=(6, 8))
    chosen = protocol(split_method=pb.SPLIT_METHOD_TIME, test_fraction=0.3, cold_start_fraction=0, k=1)
    split = split_pairs(pairs, chosen)
    knows = lambda rows: np.eye(8)[np.asarray(rows) + 2]  # noqa: E731 - each customer's niche item
    evaluation = evaluate(knows, knows, pairs, split, chosen)
    assert evaluation.warm.customer_count == 6 and evaluation.warm.held_out_interaction_count == 6
    assert evaluation.warm.model_metrics.precision_at_k == 1.0
    # Popularity's one list, less each customer's training items 0 and 1: item 2 first.
    assert evaluation.warm.baseline_metrics.precision_at_k == pytest.approx(1 / 6)
    assert evaluation.warm.baseline_metrics.catalog_coverage == pytest.approx(1 / 8)
    assert evaluation.warm.model_metrics.catalog_coverage == pytest.approx(6 / 8)
    assert evaluation.passed_gate and not evaluation.HasField("cold_start")
    popular = popularity_ranker(pairs, split.train)
    rejected = evaluate(popular, popular, pairs, split, chosen)
    assert not rejected.passed_gate  # popularity is not 10 % better than itself
    assert "passed" in gate_message(evaluation)


def test_a_model_no_better_than_popularity_is_rejected_with_its_figures():
    rows = [c for c in range(4) for _ in range(4)]
    cols = [item for c in range(4) for item in (0, 1, 2, 3)]
    times = [t for _ in range(4) for t in (1, 2, 3, 4)]
    pairs = pairs_of(rows, cols, times=times, shape=(4, 6))
    chosen = protocol(split_method=pb.SPLIT_METHOD_TIME, test_fraction=0.25, cold_start_fraction=0.25, k=1)
    split = split_pairs(pairs, chosen)
    wrong = lambda rows: np.tile(np.arange(6, dtype=float), (len(rows), 1))  # noqa: E731 - item 5 first
    evaluation = evaluate(wrong, wrong, pairs, split, chosen)
    assert evaluation.warm.baseline_metrics.precision_at_k == 1.0  # item 3 is held out everywhere
    assert evaluation.warm.model_metrics.precision_at_k == 0.0
    assert not evaluation.passed_gate
    assert evaluation.required_precision_at_k == pytest.approx(1.1)
    assert evaluation.cold_start.customer_count == 1
    assert evaluation.cold_start.held_out_interaction_count == 4
    assert gate_message(evaluation) == (
        "warm precision@1 0.0000 vs required 1.1000 (popularity 1.0000, margin 10%): rejected"
    )
