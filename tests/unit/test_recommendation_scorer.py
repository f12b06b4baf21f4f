"""The scoring engine: exact top-k against brute force, batch against one by one, the MMR
re-rank, the ANN index (recall, filters) and its storage with the artefact."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.artefacts import (
    ANN_INDEX,
    ArtefactError,
    ModelArtefact,
    read_artefact,
    write_artefact,
)
from services.recommendation.serving import ann_index
from services.recommendation.serving.ann_index import AnnIndex
from services.recommendation.serving.diversity import rerank
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.new_items import with_new_items
from services.recommendation.serving.scorer import (
    Candidates,
    best_of,
    exact_top_k,
    top_k,
    top_k_among,
    top_k_many,
)
from services.recommendation.serving.synthetic_items import clustered_items, items_artefact
from services.recommendation.training.pipeline import Progress, run_training
from services.recommendation.training.synthetic import Shape, StaticSource, generate

D = 8


def random_model(n: int, seed: int = 0, rounded: bool = False) -> ServingModel:
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(n, D))
    if rounded:  # many equal scores
        embeddings = np.round(embeddings)
    return ServingModel.from_artefact(items_artefact(embeddings, np.round(rng.normal(size=n), 1)))


def clustered(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    items = clustered_items(n, 32, 100)
    return items.embeddings, items.biases, items.cluster


def brute_force(model: ServingModel, query: np.ndarray, k: int, allowed: np.ndarray | None) -> list[int]:
    scores = model.items.astype(np.float64) @ query
    rows = np.arange(len(scores)) if allowed is None else np.flatnonzero(allowed)
    return [int(r) for r in rows[np.lexsort((rows, -scores[rows]))][:k]]


def query_for(model: ServingModel, seed: int) -> np.ndarray:
    return model.query_of(np.random.default_rng(seed).normal(size=model.dimensions).astype(np.float32))


# Exact top-k ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 500, 20_000])
@pytest.mark.parametrize("rounded", [False, True])
def test_exact_top_k_equals_brute_force_with_and_without_a_mask(n: int, rounded: bool) -> None:
    model = random_model(n, seed=n, rounded=rounded)
    rng = np.random.default_rng(n)
    for trial in range(6):
        query = query_for(model, trial)
        allowed = None if trial % 2 else rng.random(n) < rng.choice([0.01, 0.3, 0.9])
        for k in (1, 10, 100):
            rows, scores = top_k(model, query, k, allowed)
            assert list(rows) == brute_force(model, query, k, allowed)
            assert np.allclose(scores, model.items[rows] @ query, atol=1e-5)
            assert rows.dtype == np.int64 and scores.dtype == np.float32


@pytest.mark.parametrize("n", [7, 500, 20_000])
@pytest.mark.parametrize("rounded", [False, True])
def test_the_filter_candidates_less_blocked_rows_give_the_top_k_of_the_whole_catalog(
    n: int, rounded: bool
) -> None:
    model = random_model(n, seed=n, rounded=rounded)
    rng = np.random.default_rng(n)
    for trial in range(6):
        query = query_for(model, trial)
        kept = rng.random(n) < rng.choice([0.05, 0.5, 0.75])
        candidates = Candidates.of(model, kept)
        # Blocked: some candidates and some rows the filter already leaves out.
        blocked = sorted(set(rng.integers(0, n, size=rng.integers(0, 12)).tolist()))
        allowed = kept.copy()
        allowed[blocked] = False
        for k in (1, 10, 100):
            rows, scores = top_k_among(candidates, query, k, blocked)
            expected, expected_scores = exact_top_k(model, query, k, allowed)
            assert list(rows) == list(expected) == brute_force(model, query, k, allowed)
            assert np.array_equal(scores, expected_scores)  # the same products, bit for bit
            assert rows.dtype == np.int64 and scores.dtype == np.float32


def test_an_allowed_candidate_scoring_minus_infinity_is_not_mistaken_for_a_blocked_one() -> None:
    model = ServingModel.from_artefact(items_artefact(np.ones((10, D)), np.ones(10)))
    query = model.query_of(np.zeros(D, np.float32))
    query[-1] = -np.inf  # every score -inf (a bias of 1 times -inf)
    candidates = Candidates.of(model, np.ones(10, dtype=bool))
    rows, scores = top_k_among(candidates, query, 5, [0, 2])
    assert list(rows) == [1, 3, 4, 5, 6] and np.all(scores == -np.inf)


def test_ties_are_broken_by_the_lower_row() -> None:
    scores = np.zeros(50_000, dtype=np.float32)
    scores[[40_000, 7, 30_000]] = 2.0
    rows, values = best_of(scores, 5)
    assert list(rows) == [7, 30_000, 40_000, 0, 1]
    assert list(values) == [2.0, 2.0, 2.0, 0.0, 0.0]


def test_k_beyond_the_allowed_items_returns_only_those_and_an_empty_mask_nothing() -> None:
    model = random_model(30_000)
    query = query_for(model, 1)
    allowed = np.zeros(30_000, dtype=bool)
    assert len(top_k(model, query, 10, allowed)[0]) == 0
    allowed[[5, 29_999, 100]] = True
    rows, _ = top_k(model, query, 10, allowed)
    assert sorted(rows) == [5, 100, 29_999]
    assert list(rows) == brute_force(model, query, 10, allowed)
    assert len(top_k(model, query, 0)[0]) == 0
    empty = ServingModel.from_artefact(items_artefact(np.zeros((0, D)), np.zeros(0)))
    assert len(top_k(empty, empty.query_of(np.zeros(D, np.float32)), 5)[0]) == 0


def test_a_result_is_not_changed_by_the_next_call_reusing_the_scratch_buffer() -> None:
    model = random_model(20_000)
    first_rows, first_scores = top_k(model, query_for(model, 1), 10)
    kept = first_scores.copy()
    top_k(model, query_for(model, 2), 10)
    assert np.array_equal(first_scores, kept)
    assert np.allclose(first_scores, model.items[first_rows] @ query_for(model, 1), atol=1e-5)


def test_many_queries_give_what_each_query_gives_alone_with_shared_and_own_masks() -> None:
    model = random_model(20_000, seed=3)
    rng = np.random.default_rng(3)
    queries = np.stack([query_for(model, seed) for seed in range(9)])
    shared = rng.random(20_000) < 0.5
    own = rng.random((9, 20_000)) < 0.2
    for allowed in (None, shared, own):
        rows, scores = top_k_many(model, queries, 10, allowed)
        for index, query in enumerate(queries):
            mask = allowed if allowed is None or allowed.ndim == 1 else allowed[index]
            alone_rows, alone_scores = top_k(model, query, 10, mask)
            assert list(rows[index]) == list(alone_rows)
            assert np.allclose(scores[index], alone_scores, atol=1e-5)


def test_many_queries_are_scored_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    from services.recommendation.serving import scorer

    model = random_model(1_000, seed=4)
    queries = np.stack([query_for(model, seed) for seed in range(7)])
    whole, _ = top_k_many(model, queries, 5)
    monkeypatch.setattr(scorer, "BLOCK_FLOATS", 2_000)  # two queries a block
    assert [list(r) for r in top_k_many(model, queries, 5)[0]] == [list(r) for r in whole]


# MMR -----------------------------------------------------------------------------------


def test_no_diversity_keeps_the_relevance_order() -> None:
    model = random_model(5_000, seed=5)
    rows, scores = top_k(model, query_for(model, 5), 200)
    assert list(rerank(model, rows, scores, 20, 0.0)) == list(rows[:20])


def test_diversity_picks_items_unlike_those_already_chosen() -> None:
    # Candidates: ten near-copies of one direction (the best scores), then ten of other directions.
    rng = np.random.default_rng(6)
    direction = np.eye(D)[0]
    copies = direction + 0.01 * rng.normal(size=(10, D))
    others = np.eye(D)[1:3].repeat(5, axis=0) + 0.01 * rng.normal(size=(10, D))
    model = ServingModel.from_artefact(items_artefact(np.vstack([copies, others]), np.zeros(20)))
    rows = np.arange(20)
    scores = np.linspace(1.0, 0.5, 20, dtype=np.float32)
    relevant = rerank(model, rows, scores, 3, 0.0)
    diverse = rerank(model, rows, scores, 3, 1.0)
    assert list(relevant) == [0, 1, 2]
    assert diverse[0] == 0  # the most relevant first, whatever the diversity
    assert {int(row) // 5 for row in diverse[1:]} == {2, 3}  # one of each other direction
    halfway = rerank(model, rows, scores, 20, 0.5)
    assert sorted(halfway) == list(range(20))  # a permutation of the candidates


def test_mmr_matches_its_definition_on_a_large_pool() -> None:
    model = random_model(20_000, seed=7)
    rows, scores = top_k(model, query_for(model, 7), 4_000)
    chosen = rerank(model, rows, scores, 30, 0.3)
    # The definition, step by step, in float64.
    vectors = model.items[rows, :-1].astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1)[:, None]
    relevance = (scores - scores.min()) / (scores.max() - scores.min())
    expected = [0]
    while len(expected) < 30:
        closest = (vectors @ vectors[expected].T).max(axis=1)
        value = 0.7 * relevance - 0.3 * closest
        value[expected] = -np.inf
        expected.append(int(np.argmax(value)))
    assert list(chosen) == list(rows[expected])


# ANN -----------------------------------------------------------------------------------


def ann_model(n: int = 20_000) -> tuple[ServingModel, np.ndarray]:
    embeddings, biases, cluster = clustered(n)
    artefact = items_artefact(embeddings, biases)
    model = ServingModel.from_artefact(artefact)
    return ServingModel.from_artefact(artefact, ann=AnnIndex.build(model.items)), cluster


def recall(model: ServingModel, queries: list[np.ndarray], masks: list[np.ndarray | None]) -> float:
    """recall@10 of top_k through the index; the index itself must answer most queries."""
    assert model.ann is not None
    found = answered = 0
    for query, mask in zip(queries, masks, strict=True):
        answered += model.ann.search(model.items, query, 10, mask) is not None
        rows, _ = top_k(model, query, 10, mask, ann_min_items=1)
        if mask is not None:
            assert mask[rows].all()
        found += len(set(rows) & set(exact_top_k(model, query, 10, mask)[0]))
    assert answered >= 0.8 * len(queries)
    return found / (10 * len(queries))


def test_the_ann_index_finds_the_exact_top_10_with_and_without_filters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ann_index, "SAMPLE_ROWS", 1_000)  # a sample of 1 item in 20, as at scale
    model, cluster = ann_model()
    rng = np.random.default_rng(8)
    customers = clustered_items(len(cluster), 32, 100).customers(200, seed=9)
    queries = [model.query_of(vector) for vector in customers]
    assert recall(model, queries, [None] * len(queries)) >= 0.95
    excluded = [rng.random(len(cluster)) >= 0.7 for _ in queries]  # 30 % of the items allowed
    assert recall(model, queries, excluded) >= 0.95
    # A category filter may leave out the customer's region: the sample's seeds find the rest.
    categories = [np.isin(cluster % 10, rng.choice(10, 3, replace=False)) for _ in queries]
    assert recall(model, queries, categories) >= 0.95


def test_a_filter_leaving_few_allowed_in_the_scanned_lists_is_scanned_under_the_selector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Over-fetching finds no allowed item near the query (its own category is filtered out):
    # the lists are scanned again under the bitmap selector, and the answer is still exact.
    model, cluster = ann_model()
    assert model.ann is not None
    selectors: list[int] = []
    bitmap = ann_index._Mask.selector
    monkeypatch.setattr(ann_index._Mask, "selector", lambda mask: selectors.append(1) or bitmap(mask))
    customers = clustered_items(len(cluster), 32, 100).customers(40, seed=9)
    answered = 0
    for vector in customers:
        query = model.query_of(vector)
        own = cluster[exact_top_k(model, query, 1)[0][0]] % 10
        allowed = cluster % 10 != own  # 90 % allowed, none of them in the query's region
        found = model.ann.search(model.items, query, 10, allowed)
        if found is not None:
            answered += 1
            assert allowed[found[0]].all()
            assert list(found[0]) == brute_force(model, query, 10, allowed)
    assert answered >= 30
    assert selectors  # over-fetching 10 x 2 / 0.9 + 16 found fewer than 10 allowed


def test_items_appended_after_training_are_scored_beside_the_index(monkeypatch: pytest.MonkeyPatch) -> None:
    # new_items.py appends items by their known features; the index covers the trained rows
    # and the appended ones are scored exactly beside it, under the same mask.
    model, cluster = ann_model()
    artefact = model.artefact
    customers = clustered_items(len(cluster), 32, 100).customers(60, seed=9)
    tags = (10.0 * customers[:5]).astype(np.float32)  # tags aimed at some customers' tastes
    items = len(artefact.item_ids)
    trained = ServingModel.from_artefact(
        dataclasses.replace(
            artefact,
            item_feature_embeddings=np.vstack([artefact.item_feature_embeddings, tags]),
            item_feature_biases=np.append(artefact.item_feature_biases, np.zeros(5, np.float32)),
            item_feature_names=[*artefact.item_feature_names, *(f"tag:t{j}" for j in range(5))],
            item_features=scipy.sparse.hstack(
                [artefact.item_features, scipy.sparse.csr_matrix((items, 5))], format="csr", dtype=np.float32
            ),
        ),
        ann=model.ann,
    )
    folded = with_new_items(trained, [(f"n{j}", (f"tag:t{j % 5}", f"tag:x{j}")) for j in range(40)], 0.6)
    assert len(folded.items) == items + 40 and folded.ann is model.ann
    assert np.allclose(folded.items[items, :-1], 0.2 * tags[0])  # 0.4 / 2 features, one unknown
    searched: list[int] = []
    search = model.ann.search  # type: ignore[union-attr]
    monkeypatch.setattr(model.ann, "search", lambda *args: searched.append(1) or search(*args))
    rng = np.random.default_rng(11)
    found = appended = 0
    for vector in customers:
        query = folded.query_of(vector)
        allowed = rng.random(len(folded.items)) < 0.5
        rows, _ = top_k(folded, query, 10, allowed, ann_min_items=1)
        assert allowed[rows].all()
        appended += int(np.count_nonzero(rows >= items))
        found += len(set(rows) & set(brute_force(folded, query, 10, allowed)))
    assert len(searched) == len(customers)  # through the index every time
    assert appended > 0 and found / (10 * len(customers)) >= 0.95


def test_the_index_is_used_only_from_the_switch_size(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = ann_model(2_000)
    assert model.ann is not None
    calls: list[int] = []
    search = model.ann.search
    monkeypatch.setattr(model.ann, "search", lambda *args: calls.append(1) or search(*args))
    query = model.query_of(np.ones(model.dimensions, np.float32))
    top_k(model, query, 10)
    assert calls == []
    top_k(model, query, 10, ann_min_items=2_000)
    assert calls == [1]
    few = np.zeros(2_000, dtype=bool)
    few[::20] = True  # 1 item in 20: the allowed rows are scored exactly, without the index
    rows, _ = top_k(model, query, 10, few, ann_min_items=2_000)
    assert calls == [1]
    assert list(rows) == brute_force(model, query, 10, few)


def test_an_index_that_cannot_find_k_allowed_items_falls_back_to_exact() -> None:
    model, _ = ann_model(2_000)
    assert model.ann is not None
    query = model.query_of(np.ones(model.dimensions, np.float32))
    allowed = np.zeros(2_000, dtype=bool)
    allowed[[3, 1_999]] = True
    assert model.ann.search(model.items, query, 10, allowed) is None
    assert sorted(top_k(model, query, 10, allowed, ann_min_items=1)[0]) == [3, 1_999]


# The index stored with the artefact ----------------------------------------------------


def test_the_index_is_written_with_the_artefact_and_read_back(tmp_path: Path) -> None:
    embeddings, biases, _ = clustered(3_000)
    plain = items_artefact(embeddings, biases)
    index = AnnIndex.build(ServingModel.from_artefact(plain).items)
    checksum = write_artefact(
        tmp_path, ModelArtefact(**{**plain.__dict__, "version": "v2", "ann_index": index})
    )
    read = read_artefact(tmp_path, "v2", checksum)
    assert read.ann_index is not None and read.ann_index.size == 3_000
    model = ServingModel.from_artefact(read)
    assert model.ann is read.ann_index
    query = model.query_of(embeddings[0])
    assert list(top_k(model, query, 10, ann_min_items=1)[0]) == list(exact_top_k(model, query, 10)[0])
    # An artefact without an index reads as before.
    write_artefact(tmp_path, plain)
    assert read_artefact(tmp_path, "v1").ann_index is None
    assert ServingModel.from_artefact(read_artefact(tmp_path, "v1")).ann is None


def test_a_tampered_index_file_fails_the_checksum(tmp_path: Path) -> None:
    embeddings, biases, _ = clustered(1_000)
    plain = items_artefact(embeddings, biases)
    index = AnnIndex.build(ServingModel.from_artefact(plain).items)
    checksum = write_artefact(tmp_path, ModelArtefact(**{**plain.__dict__, "ann_index": index}))
    path = tmp_path / "v1" / ANN_INDEX
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match=ANN_INDEX):
        read_artefact(tmp_path, "v1", checksum)
    path.unlink()
    with pytest.raises(ArtefactError):
        read_artefact(tmp_path, "v1", checksum)


async def test_training_builds_the_index_from_the_switch_size_and_not_below(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.recommendation.serving import scorer

    data = generate(Shape(customers=200, items=300, interactions=5_000, seed=5))
    options = pb.TrainingOptions(lightfm=pb.LightFMParameters(epochs=2))
    below = await run_training(StaticSource(data), options, lambda progress: None)
    assert below.artefact is not None and below.artefact.ann_index is None
    assert "BUILDING_INDEX" not in below.phase_seconds
    monkeypatch.setattr(scorer, "ANN_MIN_ITEMS", 300)
    seen: list[Progress] = []
    above = await run_training(StaticSource(data), options, seen.append)
    assert above.artefact is not None and above.artefact.ann_index is not None
    assert "BUILDING_INDEX" in above.phase_seconds
    assert seen[-1].phase == "WRITING" and "index" in seen[-1].message
    model = ServingModel.from_artefact(above.artefact)
    assert model.ann is not None and model.ann.fits(model.items)
    query = model.query_of(model.items[0, :-1])
    assert list(top_k(model, query, 10, ann_min_items=1)[0]) == list(exact_top_k(model, query, 10)[0])


def test_a_mask_of_zeros_and_ones_counts_as_a_bool_mask() -> None:
    model = random_model(20_000, seed=9)
    query = query_for(model, 9)
    allowed = (np.random.default_rng(9).random(20_000) < 0.3).astype(np.int8)
    assert list(top_k(model, query, 10, allowed)[0]) == brute_force(model, query, 10, allowed.astype(bool))
