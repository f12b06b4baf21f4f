"""Customer vectors and reasons on a model trained on a small generated dataset: each
reason's contribution is exactly the fall in the item's score when its feature or term is
taken away, reasons rest only on the evidence's data categories, and the fold-in follows
fresh items."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.interactions import StoredInteraction
from services.recommendation.serving.customer_vectors import (
    FEATURE,
    ITEM,
    Evidence,
    attribute_weight,
    customer_vector,
    feature_scheme,
    fold_in_weight,
    mean_fold_in,
)
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.reasons import (
    ITEM_FEATURE,
    POPULAR,
    SHARED_FEATURE,
    SIMILAR_ITEM,
    ScoreReason,
    reason_message,
    reason_text,
    reasons_for,
    similar_item_reasons,
)
from services.recommendation.serving.scorer import top_k
from services.recommendation.training.dataset import ATTRIBUTE_CATEGORIES
from services.recommendation.training.features import customer_metadata
from services.recommendation.training.options import resolve_options
from services.recommendation.training.pipeline import artefact_of, as_json, build_features
from services.recommendation.training.synthetic import CATEGORY, Shape, generate
from services.recommendation.training.trainer import fit

PURCHASES = CATEGORY
BROWSING = "user.behavior.browsing_history"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained():
    data = generate(Shape(customers=150, items=300, interactions=6000, seed=3))
    options = resolve_options(
        pb.TrainingOptions(
            lightfm=pb.LightFMParameters(epochs=8, no_components=16),
            evaluation=pb.EvaluationProtocol(random_seed=3),
        )
    )
    features = build_features(data, options)
    fitted = fit(
        features.pairs.matrix(),
        features.customers.matrix,
        features.items.matrix,
        options.lightfm,
        options.evaluation.random_seed,
    )
    artefact = dataclasses.replace(
        artefact_of(fitted, features, features.customers, {"options": as_json(options)}), version="v1"
    )
    return ServingModel.from_artefact(artefact), data, options


def attributes_of(data, options, customer_id: str) -> tuple[tuple[str, str], ...]:
    names = customer_metadata(data.customers[customer_id], list(options.features.customer_attributes))
    return tuple((name, ATTRIBUTE_CATEGORIES[name.partition(":")[0]]) for name in names)


def score(model: ServingModel, evidence: Evidence, row: int) -> float:
    vector = customer_vector(model, evidence)
    return 0.0 if vector is None else float(model.items[row] @ vector.query)


def evidences(model: ServingModel, data, options) -> list[Evidence]:
    """Known customers (learned row and attributes), and unknown ones from attributes alone."""
    known = list(model.customer_rows)[:4]
    found = [Evidence(cid, PURCHASES, attributes_of(data, options, cid)) for cid in known]
    found += [Evidence(f"new-{cid}", "", attributes_of(data, options, cid)) for cid in known]
    return found


def without_feature(evidence: Evidence, feature: str) -> Evidence:
    if feature.startswith("customer:"):
        return dataclasses.replace(evidence, identity_category="")
    return dataclasses.replace(evidence, attributes=tuple(a for a in evidence.attributes if a[0] != feature))


def test_taking_away_the_top_customer_feature_lowers_the_score_by_its_contribution(trained):
    model, data, options = trained
    checked = 0
    for evidence in evidences(model, data, options):
        vector = customer_vector(model, evidence)
        assert vector is not None
        rows, scores = top_k(model, vector.query, 5)
        for row, ranked in zip(rows, scores, strict=True):
            reasons = [r for r in reasons_for(model, vector, int(row), 10) if r.kind == FEATURE]
            assert reasons, "a personalised item has a customer-feature reason"
            top = reasons[0]
            fall = float(ranked) - score(model, without_feature(evidence, top.feature), int(row))
            assert fall == pytest.approx(top.contribution, abs=TOLERANCE)
            checked += 1
    assert checked == 40


def test_taking_away_the_top_item_feature_lowers_the_score_by_its_contribution(trained):
    model, data, options = trained
    artefact = model.artefact
    for evidence in evidences(model, data, options):
        evidence = dataclasses.replace(evidence, items=(("item-00007", 1.0, BROWSING),))
        vector = customer_vector(model, evidence)
        assert vector is not None
        rows, scores = top_k(model, vector.query, 5)
        for row, ranked in zip(rows, scores, strict=True):
            top = next(r for r in reasons_for(model, vector, int(row), 20) if r.kind == ITEM_FEATURE)
            # The item rebuilt from its feature row without that feature (its bias kept).
            features = artefact.item_features[int(row)].toarray()[0]
            features[model.item_feature_rows[top.feature]] = 0.0
            rebuilt = features @ artefact.item_feature_embeddings
            after = float(rebuilt @ vector.query[:-1]) + float(model.items[row, -1])
            assert float(ranked) - after == pytest.approx(top.contribution, abs=TOLERANCE)


def test_item_terms_and_popularity_are_exact_parts_of_the_score(trained):
    model, data, options = trained
    customer_id = next(iter(model.customer_rows))
    items = (("item-00011", 4.0, PURCHASES), ("item-00012", 1.0, BROWSING), ("item-00013", 1.0, PURCHASES))
    for evidence in (
        Evidence(customer_id, PURCHASES, attributes_of(data, options, customer_id), items),
        Evidence("", "", (), tuple((item_id, weight, "") for item_id, weight, _ in items)),  # anonymous
    ):
        vector = customer_vector(model, evidence)
        assert vector is not None
        # The terms add up to the query.
        np.testing.assert_allclose(
            np.sum([term.representation for term in vector.terms], axis=0), vector.query[:-1], atol=1e-5
        )
        assert [t.name for t in vector.terms if t.kind == ITEM] == [item_id for item_id, *_ in items]
        rows, scores = top_k(model, vector.query, 10)
        for row, ranked in zip(rows, scores, strict=True):
            for reason in reasons_for(model, vector, int(row), 30):
                if reason.kind == SIMILAR_ITEM:
                    term = next(t for t in vector.terms if t.name == reason.item_id)
                    after = float(model.items[row, :-1] @ (vector.query[:-1] - term.representation))
                    after += float(model.items[row, -1])
                elif reason.kind == POPULAR:
                    after = float(model.items[row, :-1] @ vector.query[:-1])
                else:
                    continue
                assert float(ranked) - after == pytest.approx(reason.contribution, abs=TOLERANCE)


def test_reasons_rest_only_on_the_evidences_data_categories_largest_first(trained):
    model, data, options = trained
    customer_id = list(model.customer_rows)[1]
    attributes = attributes_of(data, options, customer_id)
    for evidence in (
        Evidence(customer_id, PURCHASES, attributes, (("item-00020", 1.0, BROWSING),)),
        Evidence(customer_id, "", attributes[:1]),
        Evidence(f"new-{customer_id}", "", attributes[1:], (("item-00021", 2.0, PURCHASES),)),
    ):
        vector = customer_vector(model, evidence)
        assert vector is not None
        allowed = (
            {evidence.identity_category}
            | {c for _, c in evidence.attributes}
            | {c for *_, c in evidence.items}
        )
        assert set(vector.data_categories) <= allowed - {""}
        rows, _ = top_k(model, vector.query, 10)
        for row in rows:
            reasons = reasons_for(model, vector, int(row), 5)
            assert 1 <= len(reasons) <= 5
            contributions = [r.contribution for r in reasons]
            assert contributions == sorted(contributions, reverse=True) and min(contributions) > 0
            assert {r.data_category for r in reasons} <= set(vector.data_categories) | {""}
            assert all(r.data_category == "" for r in reasons if r.kind == POPULAR)


def test_an_unknown_customer_is_served_from_attributes_each_with_a_fixed_weight(trained):
    model, data, options = trained
    customer_id = list(model.customer_rows)[2]
    attributes = attributes_of(data, options, customer_id)
    assert len(attributes) == 3
    assert customer_vector(model, Evidence(f"new-{customer_id}")) is None  # nothing usable: cold start
    both = customer_vector(model, Evidence("new", "", attributes[:2]))
    one = customer_vector(model, Evidence("new", "", attributes[:1]))
    assert both is not None and one is not None
    # The first attribute's term does not depend on the second being consented too.
    np.testing.assert_array_equal(both.terms[0].representation, one.terms[0].representation)
    column = model.customer_feature_rows[attributes[0][0]]
    np.testing.assert_allclose(
        one.terms[0].representation,
        attribute_weight(model) * model.artefact.customer_feature_embeddings[column],
        rtol=1e-6,
    )
    assert attribute_weight(model) == pytest.approx(0.4 / 3)
    # An identity the evidence does not allow is not used, and an unknown item is not folded in.
    vector = customer_vector(model, Evidence(customer_id, "", (), (("no-such-item", 1.0, PURCHASES),)))
    assert vector is None


def test_fresh_items_move_the_ranking_towards_them_and_the_fold_in_is_repeatable(trained):
    model, data, options = trained
    fresh = tuple((f"item-{i:05d}", 1.0, PURCHASES) for i in (30, 31, 32, 33, 34))
    for customer_id, identity in ((list(model.customer_rows)[3], PURCHASES), ("new", "")):
        attributes = attributes_of(data, options, list(model.customer_rows)[3])
        before = customer_vector(model, Evidence(customer_id, identity, attributes))
        after = customer_vector(model, Evidence(customer_id, identity, attributes, fresh))
        again = customer_vector(model, Evidence(customer_id, identity, attributes, fresh))
        mean = customer_vector(
            model, Evidence(customer_id, identity, attributes, fresh), fold_in=mean_fold_in
        )
        assert before is not None and after is not None and again is not None and mean is not None
        np.testing.assert_array_equal(after.query, again.query)
        rows = [model.item_rows[item_id] for item_id, *_ in fresh]
        assert (model.items[rows] @ after.query).mean() > (model.items[rows] @ before.query).mean()
        assert not np.array_equal(after.query, mean.query)


def test_similar_item_reasons_are_shared_features_with_their_part_of_the_cosine(trained):
    model, _, _ = trained
    artefact = model.artefact
    a = 5
    vectors = model.items[:, :-1] / model.item_norms[:, None]
    cosines = vectors @ vectors[a]
    cosines[a] = -np.inf
    found = 0
    for b in np.argsort(-cosines)[:5]:
        reasons = similar_item_reasons(model, a, int(b), 3)
        features_a = set(artefact.item_features[a].indices.tolist())
        for reason in reasons:
            assert reason.kind == SHARED_FEATURE and reason.data_category == ""
            column = model.item_feature_rows[reason.feature]
            assert column in features_a or reason.feature == f"item:{model.item_ids[b]}"
            # b without that feature's embedding: the dot product falls by contribution x norms.
            row = artefact.item_features[int(b)].toarray()[0]
            row[column] = 0.0
            fall = float(model.items[b, :-1] @ model.items[a, :-1]) - float(
                (row @ artefact.item_feature_embeddings) @ model.items[a, :-1]
            )
            norms = float(model.item_norms[a] * model.item_norms[b])
            assert fall / norms == pytest.approx(reason.contribution, abs=TOLERANCE)
            found += 1
    assert found > 0


def test_reason_texts_and_messages():
    def title_of(item_id: str) -> str:
        return {"ink-black-xl": "Black ink XL"}.get(item_id, "")

    cases = [
        (ScoreReason(SIMILAR_ITEM, "", "ink-black-xl", 0.5, PURCHASES), "Because you bought Black ink XL."),
        (ScoreReason(SIMILAR_ITEM, "", "ink-black-xl", 0.5, BROWSING), "Because you viewed Black ink XL."),
        (ScoreReason(SIMILAR_ITEM, "", "x-1", 0.5, ""), "Because you looked at x-1."),
        (
            ScoreReason(ITEM_FEATURE, "category:office/ink", "", 0.4, PURCHASES),
            "Matches your interest in the category office/ink.",
        ),
        (
            ScoreReason(FEATURE, "age_range:25-34", "", 0.3, "user.demographic.age_range"),
            "Popular with customers in your age range (25-34).",
        ),
        (ScoreReason(FEATURE, "customer:demo-aiko", "", 0.3, PURCHASES), "Based on your purchase history."),
        (ScoreReason(SHARED_FEATURE, "brand:inkwell", "", 0.2, ""), "Also from inkwell."),
        (ScoreReason(SHARED_FEATURE, "item:ink-colour", "", 0.2, ""), "Bought by the same customers."),
        (ScoreReason(POPULAR, "", "", 0.1, ""), "Popular with customers."),
    ]
    for reason, text in cases:
        assert reason_text(reason, title_of) == text
    message = reason_message(cases[0][0], title_of)
    assert message.kind == pb.REASON_KIND_SIMILAR_TO_RECENT_ITEM and message.item_id == "ink-black-xl"
    assert message.text == cases[0][1] and message.data_category == PURCHASES
    assert reason_message(cases[3][0], title_of).kind == pb.REASON_KIND_FEATURE
    assert reason_message(cases[-1][0], title_of).kind == pb.REASON_KIND_POPULAR


def test_fold_in_weights_follow_the_models_feature_scheme(trained):
    model, _, options = trained
    assert feature_scheme(model).identity_weight == pytest.approx(options.features.identity_weight)

    def weight(kind: int) -> float:
        return fold_in_weight(
            model,
            StoredInteraction("c", "item-00001", kind, 1.0, 0, "ev-1", profile_pb.CHANNEL_WEB, PURCHASES),
        )

    assert weight(profile_pb.INTERACTION_TYPE_PURCHASE) == 4.0
    assert weight(profile_pb.INTERACTION_TYPE_VIEW) == 1.0


def test_the_rows_parts_along_earlier_purchases_are_reasons_and_change_no_score(trained):
    model, data, options = trained
    customer = next(iter(model.customer_rows))
    evidence = Evidence(customer, PURCHASES, attributes_of(data, options, customer))
    plain = customer_vector(model, evidence)
    assert plain is not None
    best, _ = top_k(model, plain.query, 3)
    bought = tuple((model.item_ids[int(row)], PURCHASES) for row in best)
    explained = customer_vector(model, dataclasses.replace(evidence, row_items=bought))
    assert explained is not None
    # The same query (so the same scores and ranking); the terms still sum to it.
    np.testing.assert_allclose(explained.query, plain.query, atol=1e-5)
    np.testing.assert_allclose(explained.term_representations.sum(axis=0), plain.query[:-1], atol=1e-5)
    parts = [term for term in explained.terms if term.kind == ITEM]
    assert parts and {term.name for term in parts} <= {item_id for item_id, _ in bought}
    assert all(term.data_category == PURCHASES for term in parts)
    # Each "because you bought X" reason is exactly its term's part of the score.
    row = int(best[0])
    similar = [r for r in reasons_for(model, explained, row, 30) if r.kind == SIMILAR_ITEM]
    assert similar
    for reason in similar:
        term = next(term for term in parts if term.name == reason.item_id)
        assert reason.contribution == pytest.approx(
            float(term.representation @ model.items[row, :-1]), abs=TOLERANCE
        )
        assert reason.data_category == PURCHASES
    # Without the learned row (not consented, or unknown) there is nothing to explain.
    unrowed = customer_vector(model, dataclasses.replace(evidence, identity_category="", row_items=bought))
    assert unrowed is not None and not any(term.kind == ITEM for term in unrowed.terms)
