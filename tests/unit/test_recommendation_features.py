"""Features and interaction weights as the FeatureScheme says: identity plus consented
metadata, each row's weight split identity_weight / the rest, interactions weighted per
type and ratings graded around the threshold."""

from __future__ import annotations

import numpy as np
import pytest
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.catalog import Item
from services.recommendation.interactions import StoredInteraction
from services.recommendation.training.features import (
    CustomerAttributes,
    customer_metadata,
    feature_matrix,
    interaction_pairs,
    interaction_weight,
    item_metadata,
    price_band,
    without_identity,
)
from services.recommendation.training.options import resolve_options

SCHEME = resolve_options(pb.TrainingOptions()).features


def test_item_metadata_has_every_category_prefix_brand_band_and_tags():
    item = Item(
        "ink-black",
        "Ink",
        category_path=("office", "ink", "black"),
        brand="acme",
        price_micros=12_500_000,
        currency_code="EUR",
        tags=("Eco", "eco", "refill"),
    )
    assert item_metadata(item) == [
        "category:office",
        "category:office/ink",
        "category:office/ink/black",
        "brand:acme",
        "price_band:EUR:2",
        "tag:eco",
        "tag:refill",
    ]
    assert item_metadata(Item("bare", "Bare")) == []


@pytest.mark.parametrize(
    ("micros", "currency", "band"),
    [
        (0, "", ""),
        (500_000, "JPY", "JPY:0"),
        (3_000_000, "EUR", "EUR:0"),
        (3_200_000, "EUR", "EUR:1"),
        (99_000_000, "USD", "USD:3"),
        (100_000_000, "USD", "USD:4"),
    ],
)
def test_price_band_is_the_half_decade_of_the_price(micros, currency, band):
    assert price_band(micros, currency) == band


def test_customer_metadata_keeps_only_the_scheme_attributes_the_read_returned():
    customer = CustomerAttributes(
        "c-1", age_range="25-34", gender="", region="JP-13", custom={"pet_owner": "true", "tier": "gold"}
    )
    assert customer_metadata(customer, ["age_range", "gender", "region", "custom:pet_owner"]) == [
        "age_range:25-34",
        "region:JP-13",
        "custom:pet_owner:true",
    ]
    assert customer_metadata(customer, ["gender", "custom:missing"]) == []


def test_rows_split_identity_weight_and_metadata_shares_the_rest():
    full = feature_matrix(
        "customer", ["a", "b", "c"], [["age_range:25-34", "region:JP"], [], ["region:JP"]], 0.6
    )
    np.testing.assert_allclose(full.matrix.toarray()[2], [0, 0, 0.6, 0, 0.4], rtol=1e-6)
    features = without_identity(full, np.array([2]))
    assert features.names == ["customer:a", "customer:b", "customer:c", "age_range:25-34", "region:JP"]
    dense = features.matrix.toarray()
    assert features.matrix.dtype == np.float32
    np.testing.assert_allclose(dense[0], [0.6, 0, 0, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(dense[1], [0, 1.0, 0, 0, 0])  # no metadata: identity takes all
    np.testing.assert_allclose(dense[2], [0, 0, 0, 0, 0.4], rtol=1e-6)  # cold start: metadata alone


def interaction(kind: str, weight: float = 1.0, customer: str = "c", item: str = "i", at: int = 0):
    return StoredInteraction(
        customer,
        item,
        profile_pb.InteractionType.Value(f"INTERACTION_TYPE_{kind}"),
        weight,
        at,
        "e",
        0,
        "cat",
    )


def test_interaction_weights_follow_the_type_table_and_the_rating_threshold():
    assert interaction_weight(interaction("PURCHASE"), SCHEME) == 4.0
    assert interaction_weight(interaction("VIEW"), SCHEME) == 1.0
    assert interaction_weight(interaction("ADD_TO_WISHLIST"), SCHEME) == 1.5
    # Profile sends a rating r as r - 2: 5 stars -> 3.0, 3 stars -> 1.0.
    assert interaction_weight(interaction("RATING", 3.0), SCHEME) == 3.0
    assert interaction_weight(interaction("RATING", 1.0), SCHEME) == 1.0
    strict = pb.FeatureScheme()
    strict.CopyFrom(SCHEME)
    strict.rating_threshold = 4.0
    assert interaction_weight(interaction("RATING", 1.0), strict) == 0.0
    only_purchases = pb.FeatureScheme(
        interaction_type_weights=[pb.InteractionTypeWeight(interaction_type="PURCHASE", weight=2)],
        rating_threshold=3,
    )
    assert interaction_weight(interaction("VIEW"), only_purchases) == 0.0


def test_pairs_add_up_cap_at_ten_keep_the_newest_time_and_skip_unknowns():
    pairs = interaction_pairs(
        [
            interaction("PURCHASE", at=5),
            interaction("PURCHASE", at=9),
            interaction("PURCHASE", at=7),
            interaction("VIEW", item="j", at=3),
            interaction("VIEW", item="unknown"),
            interaction("VIEW", customer="stranger"),
        ],
        {"c": 0},
        {"i": 0, "j": 1},
        SCHEME,
    )
    assert pairs.interaction_count == 4
    assert pairs.matrix().toarray().tolist() == [[10.0, 1.0]]
    assert pairs.newest_time_us.tolist() == [9, 3]
