"""A generated dataset with planted structure, for the training test and the quality bench.

Customers belong to segments; a segment shows in the customer's attributes (age range and
region, with some noise) and decides their taste: most of their interactions fall in the
segment's favourite categories, the rest follow the catalog's overall popularity. A model
that learns the structure beats popularity for warm customers (from their interactions)
and for cold-start ones (from their attributes alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from najimi.profile.v1 import profile_service_pb2 as profile_pb

from services.recommendation.catalog import Item
from services.recommendation.interactions import StoredInteraction
from services.recommendation.training.dataset import TrainingData
from services.recommendation.training.features import CustomerAttributes

AGE_RANGES = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")
REGIONS = ("JP-01", "JP-13", "JP-14", "JP-23", "JP-27", "JP-40")
GENDERS = ("female", "male", "non_binary")
KINDS = (  # (interaction type, its share)
    (profile_pb.INTERACTION_TYPE_VIEW, 0.6),
    (profile_pb.INTERACTION_TYPE_ADD_TO_CART, 0.2),
    (profile_pb.INTERACTION_TYPE_PURCHASE, 0.2),
)
CATEGORY = "user.behavior.purchase_history"


@dataclass(frozen=True)
class Shape:
    customers: int = 1000
    items: int = 2000
    interactions: int = 100_000
    segments: int = 12
    top_categories: int = 12
    sub_categories: int = 6
    taste: float = 0.75  # share of a customer's interactions in their segment's categories
    attribute_noise: float = 0.1  # chance an attribute does not follow the segment
    seed: int = 1


def generate(shape: Shape = Shape()) -> TrainingData:
    rng = np.random.default_rng(shape.seed)
    tops = rng.integers(0, shape.top_categories, shape.items)
    subs = rng.integers(0, shape.sub_categories, shape.items)
    brands = tops * 3 + rng.integers(0, 3, shape.items)  # brands stay within a category
    items = [
        Item(
            f"item-{i:05d}",
            f"Item {i}",
            category_path=(f"top{tops[i]}", f"sub{subs[i]}"),
            brand=f"brand{brands[i]}",
            price_micros=int(rng.lognormal(8, 1.2) * 1_000_000),
            currency_code="JPY",
            tags=(f"tag{rng.integers(0, 20)}",),
            available=True,
        )
        for i in range(shape.items)
    ]
    popularity = 1.0 / np.arange(1, shape.items + 1) ** 0.8
    popularity = popularity[rng.permutation(shape.items)]
    popularity /= popularity.sum()
    # Each segment likes two top categories.
    likes = [rng.choice(shape.top_categories, 2, replace=False) for _ in range(shape.segments)]
    segment_items = [np.flatnonzero(np.isin(tops, liked)) for liked in likes]

    def attribute(values: tuple[str, ...], segment: int) -> str:
        noisy = rng.random() < shape.attribute_noise
        return values[rng.integers(0, len(values))] if noisy else values[segment % len(values)]

    customers: dict[str, CustomerAttributes] = {}
    interactions: list[StoredInteraction] = []
    per_customer = rng.poisson(shape.interactions / shape.customers, shape.customers).clip(2)
    kinds = [kind for kind, _ in KINDS]
    shares = [share for _, share in KINDS]
    for c in range(shape.customers):
        customer_id = f"cust-{c:05d}"
        segment = int(rng.integers(0, shape.segments))
        customers[customer_id] = CustomerAttributes(
            customer_id,
            age_range=attribute(AGE_RANGES, segment),
            region=attribute(REGIONS, segment // len(AGE_RANGES)),
            gender=GENDERS[rng.integers(0, len(GENDERS))],
        )
        own = segment_items[segment]
        weights = popularity[own] / popularity[own].sum()
        n = int(per_customer[c])
        in_taste = rng.random(n) < shape.taste
        chosen = np.where(in_taste, rng.choice(own, n, p=weights), rng.choice(shape.items, n, p=popularity))
        times = np.sort(rng.integers(1_700_000_000_000_000, 1_710_000_000_000_000, n))
        types = rng.choice(len(kinds), n, p=shares)
        interactions.extend(
            StoredInteraction(
                customer_id,
                items[int(item)].item_id,
                kinds[int(kind)],
                1.0,
                int(at),
                f"ev-{c}-{j}",
                profile_pb.CHANNEL_WEB,
                CATEGORY,
            )
            for j, (item, at, kind) in enumerate(zip(chosen, times, types, strict=True))
        )
    return TrainingData(interactions, items, customers, data_cursor=f"synthetic-{shape.seed}")


class StaticSource:
    """A TrainingSource over data already in memory (the generated datasets)."""

    def __init__(self, data: TrainingData):
        self.data = data

    async def load(self) -> TrainingData:
        return self.data
