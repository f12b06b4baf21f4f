"""Customer and item features and interaction weights, as a FeatureScheme says (pure).

Feature names are "<kind>:<value>": "customer:<id>", "age_range:25-34", "gender:female",
"region:JP-13", "custom:<key>:<value>"; "item:<id>", "category:grocery/coffee" (every
prefix of the path), "brand:acme", "price_band:EUR:2", "tag:organic". Each row's weight
sums to 1: the identity feature gets identity_weight and the metadata features share the
rest equally (a row without metadata gives identity all of it), which measured better
than identity alone or an equal share for every feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.catalog import CATEGORY_SEPARATOR, Item
from services.recommendation.interactions import StoredInteraction

# Repeated interactions of one customer with one item add up to at most this.
MAX_PAIR_WEIGHT = 10.0
# Price bands are half-decades of the price in whole units of its currency.
BANDS_PER_DECADE = 2
CUSTOM_PREFIX = "custom:"


@dataclass(frozen=True)
class CustomerAttributes:
    """What a purpose-bound profile read returned: the withheld fields are already empty."""

    customer_id: str
    age_range: str = ""
    gender: str = ""  # "female", "male", "non_binary", "undisclosed"; empty when unknown
    region: str = ""
    custom: Mapping[str, str] = field(default_factory=dict)  # key -> value as text
    custom_categories: Mapping[str, str] = field(default_factory=dict)  # key -> its data category


@dataclass(frozen=True)
class FeatureMatrix:
    """Rows (`ids`) by features (`names`), float32, each row's weights summing to 1."""

    ids: list[str]
    names: list[str]
    matrix: sp.csr_matrix

    @property
    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}


def price_band(price_micros: int, currency_code: str) -> str:
    """ "EUR:2" for 10 to 31.62 EUR; empty when the price is unknown."""
    if price_micros <= 0 or not currency_code:
        return ""
    units = price_micros / 1_000_000
    return f"{currency_code}:{math.floor(BANDS_PER_DECADE * math.log10(units)) if units >= 1 else 0}"


def item_metadata(item: Item) -> list[str]:
    """The item's metadata features: every category prefix, brand, price band, tags."""
    names = [
        f"category:{CATEGORY_SEPARATOR.join(item.category_path[: depth + 1])}"
        for depth in range(len(item.category_path))
    ]
    if item.brand:
        names.append(f"brand:{item.brand}")
    band = price_band(item.price_micros, item.currency_code)
    if band:
        names.append(f"price_band:{band}")
    names.extend(sorted({f"tag:{tag.lower()}" for tag in item.tags}))
    return names


def customer_metadata(customer: CustomerAttributes, attributes: Sequence[str]) -> list[str]:
    """The customer's features among `attributes` ("age_range", "gender", "region",
    "custom:<key>") that the purpose-bound read returned."""
    values = {"age_range": customer.age_range, "gender": customer.gender, "region": customer.region}
    names: list[str] = []
    for attribute in attributes:
        if attribute.startswith(CUSTOM_PREFIX):
            key = attribute[len(CUSTOM_PREFIX) :]
            if key in customer.custom:
                names.append(f"{CUSTOM_PREFIX}{key}:{customer.custom[key]}")
        elif values.get(attribute):
            names.append(f"{attribute}:{values[attribute]}")
    return names


def feature_matrix(
    identity_kind: str,
    ids: Sequence[str],
    metadata: Sequence[Sequence[str]],
    identity_weight: float,
) -> FeatureMatrix:
    """Identity plus metadata features of each row of `ids`; row r's identity is column r."""
    names: list[str] = [f"{identity_kind}:{row_id}" for row_id in ids]
    index = {name: i for i, name in enumerate(names)}
    rows: list[int] = []
    cols: list[int] = []
    weights: list[float] = []
    for row, row_metadata in enumerate(metadata):
        distinct = list(dict.fromkeys(row_metadata))
        identity_share = identity_weight if distinct else 1.0
        rows.append(row)
        cols.append(row)
        weights.append(identity_share)
        for name in distinct:
            if name not in index:
                index[name] = len(names)
                names.append(name)
            rows.append(row)
            cols.append(index[name])
            weights.append((1.0 - identity_share) / len(distinct))
    matrix = sp.csr_matrix(
        (np.asarray(weights, dtype=np.float32), (rows, cols)), shape=(len(ids), len(names)), dtype=np.float32
    )
    return FeatureMatrix(list(ids), names, matrix)


def without_identity(features: FeatureMatrix, rows: np.ndarray) -> FeatureMatrix:
    """`features` with the identity feature of `rows` dropped: those rows (cold-start
    customers held out whole) keep their metadata weights alone, as LightFM sees a row
    whose identity embedding is zero."""
    matrix = features.matrix.tocoo()
    keep = ~(np.isin(matrix.row, rows) & (matrix.col == matrix.row))
    return FeatureMatrix(
        features.ids,
        features.names,
        sp.csr_matrix((matrix.data[keep], (matrix.row[keep], matrix.col[keep])), shape=matrix.shape),
    )


def interaction_weight(interaction: StoredInteraction, scheme: pb.FeatureScheme) -> float:
    """The training weight of one interaction; 0 leaves it out."""
    kind = profile_pb.InteractionType.Name(interaction.interaction_type).removeprefix("INTERACTION_TYPE_")
    if kind == "RATING":
        # Profile sends a rating as its value minus 2 (its weight table's rule).
        rating = interaction.weight + 2.0
        return 1.0 + rating - scheme.rating_threshold if rating >= scheme.rating_threshold else 0.0
    for entry in scheme.interaction_type_weights:
        if entry.interaction_type == kind:
            return entry.weight
    return 0.0


@dataclass(frozen=True)
class InteractionPairs:
    """The customer-item pairs: summed weights (capped) and the newest event time of each."""

    rows: np.ndarray  # int32 customer row
    cols: np.ndarray  # int32 item row
    weights: np.ndarray  # float32
    newest_time_us: np.ndarray  # int64
    shape: tuple[int, int]  # (customers, items)
    interaction_count: int  # interactions that counted

    def matrix(self, keep: np.ndarray | None = None) -> sp.coo_matrix:
        """The weights of the pairs `keep` selects (all by default) as a float32 COO matrix."""
        keep = np.ones(len(self.rows), dtype=bool) if keep is None else keep
        return sp.coo_matrix(
            (self.weights[keep], (self.rows[keep], self.cols[keep])), shape=self.shape, dtype=np.float32
        )


def interaction_pairs(
    interactions: Sequence[StoredInteraction],
    customer_index: Mapping[str, int],
    item_index: Mapping[str, int],
    scheme: pb.FeatureScheme,
) -> InteractionPairs:
    """Customers by items; interactions with an unknown customer or item, or weight 0, are left out."""
    pairs: dict[tuple[int, int], list[float]] = {}
    counted = 0
    for interaction in interactions:
        row = customer_index.get(interaction.customer_id)
        col = item_index.get(interaction.item_id)
        weight = interaction_weight(interaction, scheme)
        if row is None or col is None or weight <= 0:
            continue
        counted += 1
        pair = pairs.setdefault((row, col), [0.0, 0.0])
        pair[0] = min(MAX_PAIR_WEIGHT, pair[0] + weight)
        pair[1] = max(pair[1], interaction.occur_time_us)
    keys = np.array(sorted(pairs), dtype=np.int32).reshape(-1, 2)
    values = [pairs[(int(r), int(c))] for r, c in keys]
    return InteractionPairs(
        rows=keys[:, 0].copy(),
        cols=keys[:, 1].copy(),
        weights=np.array([v[0] for v in values], dtype=np.float32),
        newest_time_us=np.array([v[1] for v in values], dtype=np.int64),
        shape=(len(customer_index), len(item_index)),
        interaction_count=counted,
    )
