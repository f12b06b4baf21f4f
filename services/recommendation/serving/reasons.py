"""Reasons faithful to the score: the largest terms of one item's score for one customer.

The score explained is the one top_k ranks by: customer_repr · item_repr + item_bias
(the customer's own bias is the same for every item and explains none of them). It is a
sum of terms two ways, and each reason is one exact term of one of them:

- customer side: customer_repr = Σ customer terms (customer_vectors.py), so a term's
  contribution is term.representation · item_repr: the score is lower by exactly that
  without the term. Kinds: FEATURE (the learned identity, "based on your purchase
  history"; an attribute, "popular with customers in your age range") and SIMILAR_ITEM
  (an item folded in, "because you bought X").
- item side: item_repr = Σ_f weight_f · embedding_f over the item's row of the model's
  item feature matrix, so a feature's contribution is weight_f · (embedding_f ·
  customer_repr): the score is lower by exactly that without the feature's embedding in
  the item's representation (ITEM_FEATURE: "matches your interest in category Y"; the
  item's own identity feature: "customers with tastes like yours chose it"). Its data
  category is that of the customer term contributing most to it.
- the item's bias is POPULAR: the score is lower by exactly that without it.

The two sides split the same product two ways, so listed reasons may overlap and need
not add up to the score; each one's contribution is exact for what it names. Only
positive terms are reasons, largest first.

SimilarItems: cosine(a, b) = Σ_g weight_g · (embedding_g · a) / (|a| |b|) over b's item
features; the features the two items share and b's identity ("bought by the same
customers") are its reasons (SHARED_FEATURE), each with its exact part of that sum
(holding the norms fixed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.serving.customer_vectors import FEATURE, IDENTITY_PREFIX, CustomerVector
from services.recommendation.serving.model import ServingModel

ITEM_FEATURE = "item_feature"  # a feature of the recommended item, times the customer's vector
SIMILAR_ITEM = "similar_item"  # a folded-in item (a fresh interaction or a session item)
POPULAR = "popular"  # the item's own bias
SHARED_FEATURE = "shared_feature"  # SimilarItems: a feature both items have, or b's identity

ITEM_IDENTITY_PREFIX = "item:"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"

REASON_KINDS = {
    FEATURE: pb.REASON_KIND_FEATURE,
    ITEM_FEATURE: pb.REASON_KIND_FEATURE,
    SHARED_FEATURE: pb.REASON_KIND_FEATURE,
    SIMILAR_ITEM: pb.REASON_KIND_SIMILAR_TO_RECENT_ITEM,
    POPULAR: pb.REASON_KIND_POPULAR,
}


class ScoreReason(NamedTuple):  # a tuple: made some 30 times a request, at a third of a dataclass's cost
    kind: str  # FEATURE, ITEM_FEATURE, SIMILAR_ITEM, POPULAR or SHARED_FEATURE
    feature: str  # the customer or item feature name ("age_range:25-34", "brand:acme"); "" otherwise
    item_id: str  # for SIMILAR_ITEM: the folded-in item
    contribution: float  # in score units (similarity units for SHARED_FEATURE)
    data_category: str  # "" when no customer data


# ScoreReason(*fields) without the named tuple's Python-level __new__: a third of the cost.
_reason = tuple.__new__


def _item_features(model: ServingModel, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The item's (feature columns, weights) in the model's item feature matrix."""
    matrix = model.artefact.item_features
    start, end = matrix.indptr[row], matrix.indptr[row + 1]
    return matrix.indices[start:end], matrix.data[start:end].astype(np.float32)


def reasons_for_rows(
    model: ServingModel, customer: CustomerVector, rows: np.ndarray, max_reasons: int
) -> list[tuple[ScoreReason, ...]]:
    """For each item (at `rows`), its largest positive score terms, largest first, at most
    max_reasons (ties: customer terms, then item features, then the bias, each in order).

    The items' terms are laid out as one matrix, a row per item: its customer terms, its
    item features (padded with 0 to the most any of them has), its bias; one stable sort
    per row orders them, so the work is a few array operations whatever k is."""
    count = len(rows)
    if max_reasons <= 0 or count == 0:
        return [()] * count
    rows = np.asarray(rows, dtype=np.int64)
    items = model.items[rows]  # [count, d + 1]
    terms = len(customer.terms)
    matrix = model.artefact.item_features
    starts = matrix.indptr[rows]
    counts, uniform = model.item_feature_counts
    features = counts[rows]
    width = int(features[0]) if uniform else int(np.maximum.reduce(features))
    # The items' features as [count, width] (entries past an item's own count weigh 0).
    places = np.arange(width)
    at = starts[:, None] + places
    if uniform:  # as many each: no padding
        columns = matrix.indices[at]
        weights = matrix.data[at].astype(np.float32, copy=False)
    else:
        present = places < features[:, None]
        at[~present] = 0
        columns = matrix.indices[at]
        weights = np.where(present, matrix.data[at], 0).astype(np.float32)
    embeddings = model.artefact.item_feature_embeddings
    layout = np.empty((count, terms + width + 1), dtype=np.float32)
    if terms:
        np.matmul(items[:, :-1], customer.term_representations.T, out=layout[:, :terms])
    np.multiply(weights, embeddings[columns] @ customer.query[:-1], out=layout[:, terms:-1])
    layout[:, -1] = items[:, -1]
    order = (-layout).argsort(axis=1, kind="stable")[:, :max_reasons]
    values = layout[np.arange(count)[:, None], order].tolist()
    bias = terms + width
    chosen: list[tuple[int, int, float]] = []  # (item, column of the layout, value)
    feature_at: list[tuple[int, int]] = []  # (item, place) of each chosen item feature
    for position, (columns_of, values_of) in enumerate(zip(order.tolist(), values, strict=True)):
        for column, value in zip(columns_of, values_of, strict=True):
            if value <= 0:
                break
            chosen.append((position, column, value))
            if terms <= column < bias:
                feature_at.append((position, column - terms))
    # Which customer term each chosen item feature's part rests on most, for its category.
    leading = [0] * len(feature_at)
    if terms > 1 and feature_at:
        where = tuple(np.array(feature_at).T)
        parts = weights[where][:, None] * embeddings[columns[where]]
        leading = np.argmax(customer.term_representations @ parts.T, axis=0).tolist()
    names = model.artefact.item_feature_names
    found: list[list[ScoreReason]] = [[] for _ in range(count)]
    led = iter(zip(feature_at, leading, strict=True))
    for position, column, value in chosen:
        if column < terms:
            held = customer.terms[column]
            if held.kind == FEATURE:
                reason = _reason(ScoreReason, (FEATURE, held.name, "", value, held.data_category))
            else:
                reason = _reason(ScoreReason, (SIMILAR_ITEM, "", held.name, value, held.data_category))
        elif column < bias:
            (item, place), term = next(led)
            category = customer.terms[term].data_category if terms else ""
            reason = _reason(
                ScoreReason, (ITEM_FEATURE, names[int(columns[item, place])], "", value, category)
            )
        else:
            reason = _reason(ScoreReason, (POPULAR, "", "", value, ""))
        found[position].append(reason)
    return [tuple(reasons) for reasons in found]


def reasons_for(
    model: ServingModel, customer: CustomerVector, row: int, max_reasons: int
) -> list[ScoreReason]:
    """The item's (at `row`) largest positive score terms, largest first, at most max_reasons."""
    return list(reasons_for_rows(model, customer, np.array([row]), max_reasons)[0])


def similar_item_reasons(model: ServingModel, row_a: int, row_b: int, max_reasons: int) -> list[ScoreReason]:
    """Why item b (at row_b) is similar to item a: its features shared with a, and its
    identity (bought by the same customers), each with its part of cosine(a, b), largest
    first, positive only, at most max_reasons."""
    norms = float(model.item_norms[row_a]) * float(model.item_norms[row_b])
    if norms <= 0:
        return []
    columns_a, _ = _item_features(model, row_a)
    columns_b, weights_b = _item_features(model, row_b)
    shared = set(columns_a.tolist())
    names = model.artefact.item_feature_names
    contributions = (
        weights_b * (model.artefact.item_feature_embeddings[columns_b] @ model.items[row_a, :-1]) / norms
    )
    found = [
        ScoreReason(SHARED_FEATURE, names[column], "", float(contribution), "")
        for column, contribution in zip(columns_b.tolist(), contributions, strict=True)
        if contribution > 0 and (column in shared or names[column].startswith(ITEM_IDENTITY_PREFIX))
    ]
    found.sort(key=lambda reason: -reason.contribution)
    return found[:max_reasons]


# -- texts and messages -------------------------------------------------------------------


def category_phrase(data_category: str) -> str:
    """ "user.behavior.purchase_history" -> "purchase history"."""
    return data_category.rpartition(".")[2].replace("_", " ") or "data"


def _customer_feature_text(feature: str, data_category: str) -> str:
    kind, _, value = feature.partition(":")
    if feature.startswith(IDENTITY_PREFIX):
        return f"Based on your {category_phrase(data_category)}."
    if kind == "age_range":
        return f"Popular with customers in your age range ({value})."
    if kind == "region":
        return f"Popular with customers in your region ({value})."
    if kind == "gender":
        return "Popular with customers of your gender."
    if kind == "custom":
        return f"Popular with customers with the same {value.partition(':')[0].replace('_', ' ')}."
    return f"Popular with customers like you ({kind.replace('_', ' ')})."


def _item_feature_text(feature: str, shared: bool) -> str:
    kind, _, value = feature.partition(":")
    if kind == "item":
        return "Bought by the same customers." if shared else "Chosen by customers with tastes like yours."
    described = {
        "category": f"the category {value}",
        "brand": f"the brand {value}",
        "tag": f"items tagged {value}",
        "price_band": "this price range",
    }.get(kind, f"{kind.replace('_', ' ')} {value}")
    if shared:
        return f"Also in {described}." if kind != "brand" else f"Also from {value}."
    return f"Matches your interest in {described}."


def _similar_item_text(title: str, data_category: str) -> str:
    if data_category == PURCHASES:
        return f"Because you bought {title}."
    if data_category == BROWSING:
        return f"Because you viewed {title}."
    if not data_category:  # an anonymous visitor's session
        return f"Because you looked at {title}."
    return f"Similar to {title}, which you showed interest in."


@functools.lru_cache(maxsize=4096)
def _feature_reason_text(kind: str, feature: str, data_category: str) -> str:
    if kind == FEATURE:
        return _customer_feature_text(feature, data_category)
    if kind in (ITEM_FEATURE, SHARED_FEATURE):
        return _item_feature_text(feature, kind == SHARED_FEATURE)
    return "Popular with customers."


def reason_text(reason: ScoreReason, title_of: Callable[[str], str]) -> str:
    """A short English sentence for the reason; `title_of(item_id)` names items (the item
    id itself when it returns ""). Texts that name no item are made once (cached)."""
    if reason.kind == SIMILAR_ITEM:
        return _similar_item_text(title_of(reason.item_id) or reason.item_id, reason.data_category)
    return _feature_reason_text(reason.kind, reason.feature, reason.data_category)


def reason_message(reason: ScoreReason, title_of: Callable[[str], str]) -> pb.Reason:
    """The Reason message of a reason, text included."""
    return pb.Reason(
        kind=REASON_KINDS[reason.kind],
        feature=reason.feature,
        item_id=reason.item_id,
        contribution=reason.contribution,
        text=reason_text(reason, title_of),
        data_category=reason.data_category,
    )


@functools.lru_cache(maxsize=4096)
def _kind_and_text(kind: str, feature: str, data_category: str) -> tuple[int, str]:
    return REASON_KINDS[kind], _feature_reason_text(kind, feature, data_category)


def add_reason_messages(
    container: Any, reasons: Sequence[ScoreReason], title_of: Callable[[str], str]
) -> None:
    """Appends the Reason message of each reason (text included) to a repeated Reason field
    (the fields left empty are not passed: a quarter cheaper; a text that names no item and
    its kind number looked up once per feature)."""
    add = container.add
    for kind, feature, item_id, contribution, data_category in reasons:
        if kind == SIMILAR_ITEM:
            add(
                kind=pb.REASON_KIND_SIMILAR_TO_RECENT_ITEM,
                item_id=item_id,
                contribution=contribution,
                text=_similar_item_text(title_of(item_id) or item_id, data_category),
                data_category=data_category,
            )
            continue
        number, text = _kind_and_text(kind, feature, data_category)
        if feature:
            add(
                kind=number,
                feature=feature,
                contribution=contribution,
                text=text,
                data_category=data_category,
            )
        else:
            add(kind=number, contribution=contribution, text=text, data_category=data_category)
