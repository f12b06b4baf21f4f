"""The representations the artefact holds are LightFM's own: feature rows summed through
the feature embeddings (get_item_representations / get_user_representations), and
customer · item + biases is exactly what LightFM.predict scores."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.training.options import resolve_options
from services.recommendation.training.trainer import FittedModel, fit, lightfm_model


def features(rows: int, extra: int, rng: np.random.Generator) -> sp.csr_matrix:
    identity = sp.identity(rows, dtype=np.float32, format="csr") * 0.6
    metadata = sp.random(rows, extra, density=0.3, random_state=rng, dtype=np.float32, format="csr")
    return sp.hstack([identity, metadata * 0.4]).tocsr().astype(np.float32)


def test_representations_and_scores_are_lightfms():
    rng = np.random.default_rng(3)
    interactions = sp.random(40, 30, density=0.2, random_state=rng, dtype=np.float32, format="coo")
    customers, items = features(40, 5, rng), features(30, 7, rng)
    parameters = resolve_options(pb.TrainingOptions(lightfm=pb.LightFMParameters(epochs=3))).lightfm
    model = lightfm_model(parameters, seed=1)
    model.fit((interactions > 0).astype(np.float32), user_features=customers, item_features=items, epochs=3)

    fitted = FittedModel.of(model)
    item, customer = fitted.items(items), fitted.customers(customers)
    item_biases, item_embeddings = model.get_item_representations(items)
    user_biases, user_embeddings = model.get_user_representations(customers)
    np.testing.assert_allclose(item.embeddings, item_embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(item.biases, item_biases, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(customer.embeddings, user_embeddings, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(customer.biases, user_biases, rtol=1e-5, atol=1e-6)
    assert item.embeddings.dtype == np.float32 and item.embeddings.flags.c_contiguous

    for row in (0, 17, 39):
        predicted = model.predict(row, np.arange(30), user_features=customers, item_features=items)
        ours = customer.embeddings[row] @ item.embeddings.T + item.biases + customer.biases[row]
        np.testing.assert_allclose(ours, predicted, rtol=1e-4, atol=1e-5)


def test_fit_reports_every_epoch_and_learns():
    rng = np.random.default_rng(4)
    interactions = sp.random(30, 20, density=0.3, random_state=rng, dtype=np.float32, format="coo")
    parameters = resolve_options(pb.TrainingOptions(lightfm=pb.LightFMParameters(epochs=4))).lightfm
    done: list[int] = []
    fitted = fit(interactions, features(30, 3, rng), features(20, 4, rng), parameters, 5, done.append)
    assert done == [1, 2, 3, 4]
    assert fitted.customer_feature_embeddings.shape == (33, 32)
    assert fitted.item_feature_embeddings.shape == (24, 32)
    assert np.abs(fitted.item_feature_biases).sum() > 0  # biases start at zero: it learned
