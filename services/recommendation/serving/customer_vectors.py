"""A customer's query vector, built from what may be used of them, as additive terms.

A LightFM customer representation is the weighted sum of their feature embeddings, and
their bias the weighted sum of the feature biases. Keeping each part as a Term (its
representation, its bias and the consent data category it rests on) lets serving drop
what the customer does not consent to, fold fresh or session items in, and explain a
score by its terms (reasons.py): removing a term lowers every item's score by exactly
term.representation · item_representation + term.bias.

Evidence is already filtered by consent: the caller (the serving domain) puts in only
what the customer's current consent allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from services.recommendation.serving.model import ServingModel

FEATURE = "feature"  # a customer feature the model learned (identity or attribute)
ITEM = "item"  # an item folded into the vector (a fresh interaction or a session item)


@dataclass(frozen=True)
class Term:
    kind: str  # FEATURE or ITEM
    name: str  # the feature name ("customer:<id>", "age_range:25-34") or the item id
    data_category: str  # the consent data category it rests on
    representation: np.ndarray  # float32 [d]: its part of the customer representation
    bias: float  # its part of the customer bias


@dataclass(frozen=True)
class Evidence:
    """What may be used of one customer now (already filtered by their consent)."""

    customer_id: str = ""  # empty for an anonymous visitor
    identity_category: str = ""  # the learned row may be used under this category; "" = not
    attributes: tuple[tuple[str, str], ...] = ()  # (feature name, data category)
    items: tuple[tuple[str, float, str], ...] = ()  # (item id, weight, data category), newest first


@dataclass(frozen=True)
class CustomerVector:
    terms: tuple[Term, ...]
    query: np.ndarray  # float32 [d + 1]: the representation, then 1 (model.items' bias column)
    bias: float  # the customer's own bias (constant over items)
    data_categories: tuple[str, ...] = field(default=())  # sorted, distinct, of the terms


def _feature_terms(model: ServingModel, evidence: Evidence) -> list[Term]:
    artefact = model.artefact
    terms: list[Term] = []
    row = model.customer_rows.get(evidence.customer_id) if evidence.customer_id else None
    weights: dict[str, float] = {}
    if row is not None:
        start, end = artefact.customer_features.indptr[row], artefact.customer_features.indptr[row + 1]
        for column, weight in zip(
            artefact.customer_features.indices[start:end],
            artefact.customer_features.data[start:end],
            strict=True,
        ):
            weights[artefact.customer_feature_names[column]] = float(weight)
    identity = f"customer:{evidence.customer_id}"
    if row is not None and evidence.identity_category and identity in weights:
        terms.append(_feature_term(model, identity, weights[identity], evidence.identity_category))
    share = (1.0 - weights.get(identity, 0.0)) / len(evidence.attributes) if evidence.attributes else 0.0
    for name, category in evidence.attributes:
        if name in model.customer_feature_rows:
            terms.append(_feature_term(model, name, weights.get(name, share), category))
    return terms


def _feature_term(model: ServingModel, name: str, weight: float, category: str) -> Term:
    column = model.customer_feature_rows[name]
    artefact = model.artefact
    return Term(
        kind=FEATURE,
        name=name,
        data_category=category,
        representation=(weight * artefact.customer_feature_embeddings[column]).astype(np.float32),
        bias=weight * float(artefact.customer_feature_biases[column]),
    )


def _item_terms(model: ServingModel, evidence: Evidence) -> list[Term]:
    """Fold-in baseline: the weighted mean of the items' representations."""
    known = [
        (item_id, weight, category)
        for item_id, weight, category in evidence.items
        if item_id in model.item_rows
    ]
    total = sum(weight for _, weight, _ in known)
    if total <= 0:
        return []
    return [
        Term(
            kind=ITEM,
            name=item_id,
            data_category=category,
            representation=(weight / total * model.items[model.item_rows[item_id], :-1]).astype(np.float32),
            bias=0.0,
        )
        for item_id, weight, category in known
    ]


def customer_vector(model: ServingModel, evidence: Evidence) -> CustomerVector | None:
    """The customer's vector from `evidence`; None when nothing usable is known (cold start)."""
    terms = _feature_terms(model, evidence) + _item_terms(model, evidence)
    if not terms:
        return None
    representation = np.asarray(np.sum([term.representation for term in terms], axis=0), dtype=np.float32)
    return CustomerVector(
        terms=tuple(terms),
        query=model.query_of(representation),
        bias=float(sum(term.bias for term in terms)),
        data_categories=tuple(sorted({term.data_category for term in terms if term.data_category})),
    )
