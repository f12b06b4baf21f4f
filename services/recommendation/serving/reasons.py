"""Reasons faithful to the score: the largest terms of one item's score for one customer.

score(item) = Σ_terms (term.representation · item_repr + term.bias) + item_bias, so each
customer term's contribution is exact: without that term the score is lower by exactly
its contribution. The item's own bias is the "popular" part.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.recommendation.serving.customer_vectors import FEATURE, CustomerVector
from services.recommendation.serving.model import ServingModel

POPULAR = "popular"
SIMILAR_ITEM = "similar_item"


@dataclass(frozen=True)
class ScoreReason:
    kind: str  # FEATURE, SIMILAR_ITEM or POPULAR
    feature: str  # for FEATURE: the customer feature name
    item_id: str  # for SIMILAR_ITEM: the folded-in item
    contribution: float  # in score units
    data_category: str  # "" when no customer data


def reasons_for(
    model: ServingModel, customer: CustomerVector, row: int, max_reasons: int
) -> list[ScoreReason]:
    """The item's (at `row`) largest positive score terms, largest first, at most max_reasons."""
    item = model.items[row]
    found = [
        ScoreReason(
            kind=FEATURE if term.kind == FEATURE else SIMILAR_ITEM,
            feature=term.name if term.kind == FEATURE else "",
            item_id="" if term.kind == FEATURE else term.name,
            contribution=float(np.dot(term.representation, item[:-1])) + term.bias,
            data_category=term.data_category,
        )
        for term in customer.terms
    ]
    found.append(ScoreReason(POPULAR, "", "", float(item[-1]), ""))
    found = [reason for reason in found if reason.contribution > 0]
    found.sort(key=lambda reason: -reason.contribution)
    return found[:max_reasons]
