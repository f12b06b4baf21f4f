"""Items the catalog gained after a model was trained, given a representation from their
features, so they can be recommended before the next training.

LightFM is a hybrid model: an item's representation is the weighted sum of its feature
embeddings (its identity "item:<id>" and its metadata: category prefixes, brand, price
band, tags; training/features.py), and its bias the same sum of the feature biases. An
item the model never saw has no identity embedding, but its metadata features may be
known to the model: its representation is then what LightFM gives a row holding those
features with training's weights, (1 - identity_weight) / (its metadata features) each,
the identity contributing nothing (as for a cold-start row in training). An item none of
whose features the model knows stays out (unscorable, as before: popular fallbacks).

`with_new_items` returns the trained ServingModel with those items appended after its own
rows (the trained rows keep their numbers, so the ANN index built over them still serves
them: scorer.top_k scores the appended rows exactly beside it), and the artefact's item
list and item feature matrix extended alike (the reasons read an item's features there).
active_model.py swaps the result in as one assignment: a request sees the model with or
without the new items, wholly, under the same model_version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from services.recommendation.serving.model import ServingModel

IDENTITY_PREFIX = "item:"

NewItem = tuple[str, tuple[str, ...]]  # item id, its metadata features (features.item_metadata)


def known_features(model: ServingModel, features: Sequence[str]) -> bool:
    """Whether the model learned any of these metadata features."""
    return any(name in model.item_feature_rows for name in features)


def fold_key(new: Sequence[NewItem]) -> str:
    """Names a set of appended items (their ids and features, in order)."""
    if not new:
        return ""
    digest = hashlib.sha256()
    for item_id, features in new:
        digest.update(repr((item_id, features)).encode())
    return digest.hexdigest()[:16]


def with_new_items(trained: ServingModel, new: Sequence[NewItem], identity_weight: float) -> ServingModel:
    """`trained` (a model as trained, no items appended) with `new` appended, each
    represented by its metadata features the model knows (items knowing none are skipped)."""
    new = [(item_id, features) for item_id, features in new if item_id not in trained.item_rows]
    new = [(item_id, features) for item_id, features in new if known_features(trained, features)]
    if not new:
        return trained
    artefact = trained.artefact
    rows: list[int] = []
    columns: list[int] = []
    weights: list[float] = []
    for row, (_, features) in enumerate(new):
        distinct = list(dict.fromkeys(features))
        share = (1.0 - identity_weight) / len(distinct)
        for name in distinct:
            column = trained.item_feature_rows.get(name)
            if column is not None and not name.startswith(IDENTITY_PREFIX):
                rows.append(row)
                columns.append(column)
                weights.append(share)
    added = sp.csr_matrix(
        (np.asarray(weights, dtype=np.float32), (rows, columns)),
        shape=(len(new), artefact.item_features.shape[1]),
        dtype=np.float32,
    )
    representations = np.asarray(added @ artefact.item_feature_embeddings, dtype=np.float32)
    biases = np.asarray(added @ artefact.item_feature_biases, dtype=np.float32).reshape(-1)
    appended = np.empty((len(new), trained.items.shape[1]), dtype=np.float32)
    appended[:, :-1] = representations
    appended[:, -1] = biases
    new_ids = [item_id for item_id, _ in new]
    item_ids = trained.item_ids + new_ids
    return replace(
        trained,
        artefact=replace(
            artefact,
            item_ids=item_ids,
            item_embeddings=np.concatenate([artefact.item_embeddings, representations]),
            item_biases=np.concatenate([artefact.item_biases, biases]),
            item_features=sp.vstack([artefact.item_features, added], format="csr", dtype=np.float32),
        ),
        item_ids=item_ids,
        item_rows={
            **trained.item_rows,
            **{item_id: len(trained.item_ids) + i for i, item_id in enumerate(new_ids)},
        },
        items=np.ascontiguousarray(np.concatenate([trained.items, appended])),
        item_norms=np.concatenate(
            [trained.item_norms, np.linalg.norm(representations, axis=1).astype(np.float32)]
        ),
        fold_key=fold_key(new),
    )
