"""ServingModel: one model version's arrays laid out for serving.

A LightFM score is user_repr · item_repr + user_bias + item_bias. For ranking one
customer's items the user bias is a constant, so the items are held as one C-contiguous
float32 matrix [n_items, d + 1]: the representation, then the item bias; a query is
[user_repr, 1]. One matrix-vector product scores every item.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from services.recommendation.artefacts import ModelArtefact

if TYPE_CHECKING:
    from services.recommendation.serving.ann_index import AnnIndex


def items_matrix(artefact: ModelArtefact) -> np.ndarray:
    """The items as served and indexed: float32 C-contiguous [n_items, d + 1], each row the
    item's representation, then its bias."""
    items = np.empty((len(artefact.item_biases), artefact.item_embeddings.shape[1] + 1), dtype=np.float32)
    items[:, :-1] = artefact.item_embeddings
    items[:, -1] = artefact.item_biases
    return items


@dataclass(frozen=True, eq=False)
class ServingModel:
    version: str
    artefact: ModelArtefact
    item_ids: list[str]
    item_rows: dict[str, int]
    items: np.ndarray  # float32 C-contiguous [n_items, d + 1]: representation, bias
    customer_rows: dict[str, int]
    item_feature_rows: dict[str, int]
    customer_feature_rows: dict[str, int]
    item_norms: np.ndarray  # float32 [n_items]: |item representation| (cosine, MMR)
    ann: AnnIndex | None = field(default=None)  # the approximate index for large catalogs (trained rows)
    # Items the catalog gained after training, appended by new_items.py: names which ("" none).
    fold_key: str = ""

    @property
    def key(self) -> tuple[str, str]:
        """Names this item set: caches of per-item-row arrays are kept by it."""
        return self.version, self.fold_key

    @functools.cached_property
    def item_feature_counts(self) -> tuple[np.ndarray, bool]:
        """How many features each item row has in the item feature matrix (int64 [n_items]),
        and whether every row has as many (reasons lay them out without padding then)."""
        counts = np.diff(self.artefact.item_features.indptr).astype(np.int64)
        return counts, bool(len(counts) == 0 or counts.min() == counts.max())

    @property
    def dimensions(self) -> int:
        return int(self.items.shape[1]) - 1

    @classmethod
    def from_artefact(cls, artefact: ModelArtefact, ann: AnnIndex | None = None) -> ServingModel:
        """The serving arrays of `artefact`, with `ann` or else the index stored with it."""
        items = items_matrix(artefact)
        representations = items[:, :-1]
        return cls(
            version=artefact.version,
            artefact=artefact,
            item_ids=list(artefact.item_ids),
            item_rows={item_id: row for row, item_id in enumerate(artefact.item_ids)},
            items=items,
            customer_rows={customer_id: row for row, customer_id in enumerate(artefact.customer_ids)},
            item_feature_rows={name: row for row, name in enumerate(artefact.item_feature_names)},
            customer_feature_rows={name: row for row, name in enumerate(artefact.customer_feature_names)},
            item_norms=np.linalg.norm(representations, axis=1).astype(np.float32),
            ann=ann if ann is not None else artefact.ann_index,
        )

    def query_of(self, representation: np.ndarray) -> np.ndarray:
        """The query vector [representation, 1] for a customer representation [d]."""
        query = np.empty(self.dimensions + 1, dtype=np.float32)
        query[:-1] = representation
        query[-1] = 1.0
        return query
