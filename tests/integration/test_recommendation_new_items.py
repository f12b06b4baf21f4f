"""Items upserted after a model was trained are represented by their features the model
knows (LightFM's hybrid sum), through the real stack: UpsertItems after ActivateModel, then
Recommend and SimilarItems return them, every response from one model version.

The model is test_recommendation_serving's model A (c-1 likes dimension 0) with one more
item feature, "brand:acme", whose embedding points along dimension 0 fifteen times as far
as i19, the best trained item. A new item of brand acme under grocery/tea has three
metadata features (category:grocery, category:grocery/tea, brand:acme), each weighted
(1 - identity_weight) / 3 as training would (identity_weight 0.6 by default); only the
brand is known to the model, so it gets 0.4 / 3 x 15 = 2.0 on dimension 0 and ranks first
for c-1 (i19 scores 1.0)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.artefacts import ModelArtefact
from tests.integration import test_recommendation_serving as serving_tests
from tests.integration.test_recommendation_serving import Serving, ids, model_artefact, until
from tests.recommendation_models import register

serving = serving_tests.serving  # the fixture: test_recommendation_serving's stack and models

BRAND = "brand:acme"


def with_brand(artefact: ModelArtefact) -> ModelArtefact:
    dims = artefact.item_feature_embeddings.shape[1]
    brand = np.zeros((1, dims), dtype=np.float32)
    brand[0, 0] = 15.0
    items = len(artefact.item_ids)
    return ModelArtefact(
        **{
            **artefact.__dict__,
            "item_feature_embeddings": np.vstack([artefact.item_feature_embeddings, brand]),
            "item_feature_biases": np.append(artefact.item_feature_biases, np.float32(0)),
            "item_feature_names": [*artefact.item_feature_names, BRAND],
            "item_features": scipy.sparse.hstack(
                [artefact.item_features, scipy.sparse.csr_matrix((items, 1))], format="csr", dtype=np.float32
            ),
        }
    )


async def similar(serving: Serving, item_id: str, k: int = 3) -> pb.SimilarItemsResponse:
    return await serving.stub.SimilarItems(
        pb.SimilarItemsRequest(item_id=item_id, k=k), metadata=serving.auth()
    )


async def test_an_item_added_after_training_is_recommended_by_its_known_features(serving: Serving):
    servicer = serving.servicer
    serving.versions["acme"] = await register(
        servicer.registry, servicer.model_dir, with_brand(model_artefact(False)), "model-acme"
    )
    await serving.activate("acme")
    version = serving.versions["acme"]
    assert ids(await serving.recommend("c-1", k=3)) == ["i19", "i18", "i17"]
    fresh = pb.Item(
        item_id="n-acme", title="New", category_path=["grocery", "tea"], brand="acme", available=True
    )
    unknown = pb.Item(
        item_id="n-other", title="Other", category_path=["garden"], brand="other", available=True
    )
    await serving.upsert(fresh, unknown)

    async def first_is_fresh() -> pb.Recommendations | None:
        found = await serving.recommend("c-1", k=3)
        return found if ids(found)[:1] == ["n-acme"] else None

    found = await until(first_is_fresh, "the new item recommended")
    assert ids(found) == ["n-acme", "i19", "i18"] and found.model_version == version
    assert found.items[0].score == pytest.approx(2.0, abs=1e-5)
    assert any(reason.feature == BRAND for reason in found.items[0].reasons)
    # An item none of whose features the model knows is still unscorable: never recommended.
    everything = await serving.recommend("c-1", k=50)
    assert "n-other" not in ids(everything) and len(ids(everything)) == len(ITEMS_AND_FRESH)
    # Filters still hold: the new item's category left out, or the item excluded.
    assert "n-acme" not in ids(
        await serving.recommend("c-1", k=50, filter=pb.ItemFilter(category_prefixes=["home"]))
    )
    assert "n-acme" not in ids(
        await serving.recommend("c-1", k=50, filter=pb.ItemFilter(exclude_item_ids=["n-acme"]))
    )

    # SimilarItems: from the new item (by the model, not the popular fallback), and to it.
    from_fresh = await similar(serving, "n-acme")
    assert from_fresh.model_version == version and from_fresh.fallback_reason == pb.FALLBACK_REASON_NONE
    assert (
        ids_of(from_fresh)[0] == "i18"
    )  # the trained item nearest dimension 0 alone (i19 has 0.1 on dimension 2)
    to_fresh = await similar(serving, "i19")
    assert "n-acme" in ids_of(to_fresh)
    assert from_fresh.items[0].reasons  # the cosine's terms still add up from the feature rows

    # Deleted, it is gone from the next answers (and from the model within a poll).
    await serving.stub.DeleteItem(
        pb.DeleteItemRequest(item_id="n-acme"), metadata=serving.auth("service:catalog")
    )
    assert "n-acme" not in ids(await serving.recommend("c-1", k=50))

    async def dropped() -> bool:
        held = servicer.active_model.current()
        return held is not None and "n-acme" not in held.serving.item_rows

    await until(dropped, "the deleted item dropped from the folded items")


async def test_a_new_version_folds_the_catalog_items_it_lacks_at_activation(serving: Serving):
    servicer = serving.servicer
    await serving.upsert(
        pb.Item(item_id="n-early", title="Early", category_path=["tea"], brand="acme", available=True)
    )
    serving.versions["acme"] = await register(
        servicer.registry, servicer.model_dir, with_brand(model_artefact(False)), "model-acme-2"
    )
    await serving.activate("acme")
    held = servicer.active_model.current()
    assert held is not None and "n-early" in held.serving.item_rows
    assert held.as_trained.item_rows.keys() == set(ITEMS_AND_FRESH) - {"n-acme"}
    found = await serving.recommend("c-1", k=1)
    assert ids(found) == ["n-early"] and found.model_version == serving.versions["acme"]


def ids_of(found: pb.SimilarItemsResponse) -> list[str]:
    return [item.item_id for item in found.items]


ITEMS_AND_FRESH = [f"i{i}" for i in range(20)] + ["n-acme"]
