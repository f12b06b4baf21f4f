"""The model artefact's shape (the interface shared with the registry).

Placeholder on the training branch: the registry branch owns this module (writing and
reading artefacts); on merge its version replaces this one, which holds only the type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse


@dataclass(frozen=True)
class ModelArtefact:
    version: str  # assigned by the registry before writing
    item_ids: list[str]  # row i of item arrays is item_ids[i]
    customer_ids: list[str]  # row j of customer arrays
    item_embeddings: np.ndarray  # float32 [n_items, d] (item representations: features summed)
    item_biases: np.ndarray  # float32 [n_items]
    customer_embeddings: np.ndarray  # float32 [n_customers, d]
    customer_biases: np.ndarray  # float32 [n_customers]
    item_feature_embeddings: np.ndarray  # float32 [n_item_features, d]
    item_feature_biases: np.ndarray  # float32 [n_item_features]
    customer_feature_embeddings: np.ndarray  # float32 [n_customer_features, d]
    customer_feature_biases: np.ndarray  # float32 [n_customer_features]
    item_feature_names: list[str]  # "item:ink-black-xl", "category:office/ink", "brand:x", ...
    customer_feature_names: list[str]  # "customer:demo-aiko", "age_range:25-34", ...
    item_features: scipy.sparse.csr_matrix  # [n_items, n_item_features] float32, normalised weights
    customer_features: scipy.sparse.csr_matrix  # [n_customers, n_customer_features]
    metadata: dict[str, Any] = field(default_factory=dict)  # JSON-able
