"""SimilarItems: the items nearest to one item in the active model's item space.

With a model: cosine similarity of the item representations (one matrix-vector product
over the candidates the filter allows), and as reasons the terms of that cosine: a
candidate's representation is the weighted sum of its feature embeddings, so the cosine
is a sum over the candidate's features of weight * embedding · source / (|source| |candidate|);
the features the two items share (and the candidate's own identity, "item:<id>": what
the same customers chose) are listed, largest first. No customer data is used.

Without a model, or for an item the model does not know yet: popular items under the
item's own category (its whole path; every item when it has none), fallback NO_MODEL.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.active_model import ActiveModel
from services.recommendation.catalog import category_key
from services.recommendation.serving.reasons import POPULAR, ScoreReason, similar_item_reasons
from services.recommendation.serving_catalog import CatalogSnapshot, ServingCatalog, without
from shared.db import now_micros
from shared.errors import NotFound


@dataclass(frozen=True)
class Similar:
    item_id: str
    similarity: float
    reasons: tuple[ScoreReason, ...]


@dataclass(frozen=True)
class SimilarItems:
    items: list[Similar]
    model_version: str
    fallback: int  # pb.FallbackReason
    serve_time_us: int


def item_not_found(item_id: str) -> NotFound:
    return NotFound(f"item {item_id} does not exist", reason="ITEM_NOT_FOUND", metadata={"item_id": item_id})


class SimilarFinder:
    def __init__(self, active: ActiveModel, catalog: ServingCatalog):
        self.active = active
        self.catalog = catalog

    def similar(
        self,
        item_id: str,
        k: int,
        prefixes: tuple[str, ...],
        excluded: frozenset[str],
        include_unavailable: bool,
        max_reasons: int,
    ) -> SimilarItems:
        snapshot = self.catalog.snapshot()
        catalog_row = snapshot.rows.get(item_id)
        if catalog_row is None or not snapshot.live[catalog_row]:
            raise item_not_found(item_id)
        model = self.active.current()
        row = None if model is None else model.serving.item_rows.get(item_id)
        if model is None or row is None:
            return self._popular(
                snapshot, catalog_row, k, prefixes, excluded | {item_id}, include_unavailable
            )
        serving = model.serving
        allowed = without(
            snapshot.model_mask(serving, prefixes, include_unavailable),
            serving.item_rows,
            excluded | {item_id},
        )
        source = serving.items[row, :-1]
        source_norm = float(serving.item_norms[row]) or 1e-12
        cosine = (serving.items[:, :-1] @ source) / (np.maximum(serving.item_norms, 1e-12) * source_norm)
        cosine = np.where(allowed, cosine, -np.inf)
        count = min(k, int(np.count_nonzero(allowed)))
        rows = (
            np.argpartition(-cosine, count - 1)[:count]
            if 0 < count < len(cosine)
            else np.flatnonzero(allowed)
        )
        rows = rows[np.argsort(-cosine[rows], kind="stable")][:count]
        items = [
            Similar(
                serving.item_ids[candidate],
                float(cosine[candidate]),
                tuple(similar_item_reasons(serving, row, candidate, max_reasons)),
            )
            for candidate in rows.tolist()
        ]
        return SimilarItems(items, model.version, pb.FALLBACK_REASON_NONE, now_micros())

    def _popular(
        self,
        snapshot: CatalogSnapshot,
        catalog_row: int,
        k: int,
        prefixes: tuple[str, ...],
        excluded: frozenset[str],
        include_unavailable: bool,
    ) -> SimilarItems:
        allowed = snapshot.mask(prefixes, include_unavailable)
        own = category_key(snapshot.entries[catalog_row].category_path)
        if own:
            allowed = allowed & snapshot.mask((own,), True)
        allowed = without(allowed, snapshot.rows, excluded)
        items = [
            Similar(
                snapshot.ids[row],
                float(snapshot.popularity[row]),
                (ScoreReason(POPULAR, "", "", float(snapshot.popularity[row]), ""),),
            )
            for row in snapshot.popular(allowed, k).tolist()
        ]
        return SimilarItems(items, "", pb.FALLBACK_REASON_NO_MODEL, now_micros())
