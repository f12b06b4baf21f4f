"""The serving arrays agree with LightFM's score formula (a small hand-made artefact)."""

import numpy as np
import scipy.sparse as sp

from services.recommendation.artefacts import ModelArtefact
from services.recommendation.serving.customer_vectors import FEATURE, Evidence, customer_vector
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.reasons import reasons_for
from services.recommendation.serving.scorer import top_k, top_k_many

D, ITEMS, CUSTOMERS = 8, 50, 5


def small_model() -> tuple[ServingModel, np.ndarray]:
    rng = np.random.default_rng(0)
    names = [f"customer:c{i}" for i in range(CUSTOMERS)] + ["age_range:25-34"]
    feature_embeddings = rng.normal(size=(len(names), D)).astype(np.float32)
    feature_biases = rng.normal(size=len(names)).astype(np.float32)
    features = sp.csr_matrix(
        np.hstack([np.eye(CUSTOMERS) * 0.5, np.full((CUSTOMERS, 1), 0.5)]).astype(np.float32)
    )
    customers = (features @ feature_embeddings).astype(np.float32)
    customer_biases = (features @ feature_biases).astype(np.float32)
    items = rng.normal(size=(ITEMS, D)).astype(np.float32)
    item_biases = rng.normal(size=ITEMS).astype(np.float32)
    artefact = ModelArtefact(
        "v1",
        [f"i{i}" for i in range(ITEMS)],
        [f"c{i}" for i in range(CUSTOMERS)],
        items,
        item_biases,
        customers,
        customer_biases,
        items,
        item_biases,
        feature_embeddings,
        feature_biases,
        [f"item:i{i}" for i in range(ITEMS)],
        names,
        sp.identity(ITEMS, format="csr", dtype=np.float32),
        features,
    )
    full_scores = items @ customers[1] + item_biases + customer_biases[1]
    return ServingModel.from_artefact(artefact), full_scores


def test_a_known_customers_terms_rebuild_the_lightfm_score_and_ranking() -> None:
    model, full = small_model()
    evidence = Evidence(
        "c1", "user.behavior.purchase_history", (("age_range:25-34", "user.demographic.age_range"),)
    )
    vector = customer_vector(model, evidence)
    assert vector is not None
    rows, scores = top_k(model, vector.query, 5)
    assert list(rows) == list(np.argsort(-full)[:5])
    assert np.allclose(scores + vector.bias, full[rows], atol=1e-4)
    many_rows, _ = top_k_many(model, np.stack([vector.query, vector.query]), 5)
    assert list(many_rows[1]) == list(rows)
    allowed = np.ones(ITEMS, dtype=bool)
    allowed[rows[0]] = False
    assert rows[0] not in top_k(model, vector.query, 5, allowed)[0]


def test_removing_a_reasons_term_lowers_the_score_by_its_contribution() -> None:
    model, _ = small_model()
    evidence = Evidence(
        "c1", "user.behavior.purchase_history", (("age_range:25-34", "user.demographic.age_range"),)
    )
    vector = customer_vector(model, evidence)
    assert vector is not None
    row = int(top_k(model, vector.query, 1)[0][0])
    # The customer-side reasons (the item side is tested on a trained model:
    # test_recommendation_reasons.py).
    top = next(reason for reason in reasons_for(model, vector, row, 20) if reason.kind == FEATURE)
    assert top.feature == "age_range:25-34"
    without = customer_vector(model, Evidence("c1", "user.behavior.purchase_history", ()))
    assert without is not None
    # The ranking score (the customer's own bias is the same for every item).
    before = float(model.items[row] @ vector.query)
    after = float(model.items[row] @ without.query)
    # The attribute's weight moves to nobody when it is dropped: the identity keeps its 0.5.
    assert abs((before - after) - top.contribution) < 1e-4
