"""A customer's query vector, built from what may be used of them, as additive terms.

A LightFM customer representation is the weighted sum of their feature embeddings, and
their bias the weighted sum of the feature biases. Keeping each part as a Term (its
representation, its bias and the consent data category it rests on) lets serving drop
what the customer does not consent to, fold fresh or session items in, and explain a
score by its terms (reasons.py): removing a term lowers every item's score by exactly
term.representation · item_representation + term.bias.

The terms:
- the learned identity row ("customer:<id>"), with its weight in the model's customer
  feature matrix, when the customer is known to the model and the caller may use it;
- each consented attribute the model has a feature for ("age_range:25-34"): the weight
  it has in the customer's row, or, for a customer unknown to the model (or an attribute
  that changed since), a fixed weight (1 - identity_weight) / attributes in the model's
  feature scheme — fixed, so one attribute's term does not depend on which others are
  consented, and dropping one changes nothing else;
- the learned row's parts along the customer's earlier purchases (those the model learned
  the row from): a non-negative least-squares fit of the row by those items'
  representations, each item's part a term of its own and the remainder the row's term.
  The terms still sum to the row, so the score and the ranking do not change; a purchase
  the row has nothing of (a zero weight) is no term;
- the items folded in (fresh interactions since the model was trained, or an anonymous
  visitor's session items): one term per item. The fold-in is chosen by measurement
  (bench/recommendation_quality.py, cold-start customers after 5 and 10 fresh
  events): `pairwise_fold_in` starts from the weighted mean of the items' representations
  and takes a few gradient steps of the pairwise (BPR) objective — the fresh items scored
  above sampled negatives — with the item representations fixed, which scored higher than
  the mean alone. Each step's gradient is a sum over the items, so the fold-in stays a sum
  of one part per item: each item's term is exactly its share.

Evidence is already filtered by consent: the caller (the serving domain) puts in only
what the customer's current consent allows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.optimize
from google.protobuf import json_format
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.interactions import StoredInteraction
from services.recommendation.serving.model import ServingModel
from services.recommendation.training.features import interaction_weight
from services.recommendation.training.options import resolve_options

FEATURE = "feature"  # a customer feature the model learned (identity or attribute)
ITEM = "item"  # an item folded into the vector (a fresh interaction or a session item)
IDENTITY_PREFIX = "customer:"

# The newest items folded in; older ones are the learned row's to hold.
MAX_FOLDED_ITEMS = 50
# The pairwise fold-in (measured on the generated dataset: see the module docstring).
FOLD_IN_STEPS = 5  # 10 steps measured no better (cold + 5 or 10 fresh, 3 seeds)
FOLD_IN_LEARNING_RATE = 0.5
FOLD_IN_REGULARISATION = 0.1  # on the fold-in's own part, keeping it near the mean it starts from
FOLD_IN_NEGATIVES = 64  # sampled items per step, the same ones for every request on one model
FOLD_IN_SEED = 0
# Beside a learned row the fresh items weigh this much of a cold customer's fold-in. On the
# generated dataset (tastes that do not drift) it is level with the row alone on held-out
# items (bench: warm + 5 fresh), while larger weights cost precision after a time split
# (-0.6 to -4.5 % at 0.1 to 0.3, -8 to -16 % at 0.6 to 1); recommendations must still
# follow fresh events.
KNOWN_CUSTOMER_FOLD_IN_SCALE = 0.2


@dataclass(frozen=True)
class Term:
    kind: str  # FEATURE or ITEM
    name: str  # the feature name ("customer:<id>", "age_range:25-34") or the item id
    data_category: str  # the consent data category it rests on ("" for none: session items)
    representation: np.ndarray  # float32 [d]: its part of the customer representation
    bias: float  # its part of the customer bias


@dataclass(frozen=True)
class Evidence:
    """What may be used of one customer now (already filtered by their consent)."""

    customer_id: str = ""  # empty for an anonymous visitor
    identity_category: str = ""  # the learned row may be used under this category; "" = not
    attributes: tuple[tuple[str, str], ...] = ()  # (feature name, data category)
    items: tuple[tuple[str, float, str], ...] = ()  # (item id, weight, data category), newest first
    # (item id, data category) of consented purchases the learned row was trained on (stored
    # before the model's training read its data), newest first: the row's parts along them
    # are terms of their own ("because you bought X"); used only with the row.
    row_items: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class CustomerVector:
    terms: tuple[Term, ...]
    query: np.ndarray  # float32 [d + 1]: the representation, then 1 (model.items' bias column)
    bias: float  # the customer's own bias (constant over items)
    data_categories: tuple[str, ...] = field(default=())  # sorted, distinct, of the terms
    # float32 [len(terms), d]: row i is terms[i].representation (reasons score them at once)
    term_representations: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))


# (model, base representation [d], item rows, item weights, scale) -> each item's part [rows, d]
FoldIn = Callable[[ServingModel, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def mean_fold_in(
    model: ServingModel, base: np.ndarray, rows: np.ndarray, weights: np.ndarray, scale: float = 1.0
) -> np.ndarray:
    """The naive baseline: the weighted mean of the items' representations (times scale)."""
    shares = (scale * weights / weights.sum()).astype(np.float32)
    return shares[:, None] * model.items[rows, :-1]


@dataclass(frozen=True)
class _Negatives:
    representations: np.ndarray  # float32 [steps * negatives, d]: step t's are block t
    biases: np.ndarray  # float32 [steps * negatives]


_NEGATIVES: weakref.WeakKeyDictionary[ServingModel, _Negatives] = weakref.WeakKeyDictionary()


def _negatives(model: ServingModel) -> _Negatives:
    """The sampled negatives of every step, drawn once per model (requests are repeatable)."""
    found = _NEGATIVES.get(model)
    if found is None:
        rows = np.random.default_rng(FOLD_IN_SEED).integers(
            0, len(model.item_ids), FOLD_IN_STEPS * FOLD_IN_NEGATIVES
        )
        found = _Negatives(
            np.ascontiguousarray(model.items[rows, :-1]), np.ascontiguousarray(model.items[rows, -1])
        )
        _NEGATIVES[model] = found
    return found


def pairwise_fold_in(
    model: ServingModel, base: np.ndarray, rows: np.ndarray, weights: np.ndarray, scale: float = 1.0
) -> np.ndarray:
    """Each item's part of the fold-in: the weighted mean, then FOLD_IN_STEPS gradient steps
    raising log sigmoid(score(item) - score(negative)) over the items and sampled negatives,
    with `base` (the customer's other terms) held fixed. The update is linear in each
    item's gradient, so the parts are carried one per item and sum to the fold-in.
    `scale` scales the start and the steps (a learned row beside it keeps most weight).

    Each step needs only the summed fold-in (the query), so the steps update that and
    accumulate each item's pulls; the per-item parts are put together once at the end:
    parts = decay^T * start + rate * Σ_t decay^(T-1-t) * (pulls_t.sum(1) * positive - pulls_t @ negatives_t).
    """
    if not len(model.item_ids):
        return np.zeros((len(rows), model.dimensions), dtype=np.float32)
    shares = (scale * weights / weights.sum()).astype(np.float32)
    positives = model.items[rows, :-1]
    positive_biases = model.items[rows, -1]
    start = shares[:, None] * positives
    negatives = _negatives(model)
    decay = np.float32(1.0 - FOLD_IN_LEARNING_RATE * FOLD_IN_REGULARISATION)
    rate = np.float32(FOLD_IN_LEARNING_RATE / FOLD_IN_NEGATIVES)  # shares carry the scale
    fold = start.sum(axis=0)
    pulled = np.zeros(len(rows), dtype=np.float32)  # Σ_t decay^(T-1-t) pulls_t.sum(1)
    pushed = np.zeros_like(start)  # Σ_t decay^(T-1-t) pulls_t @ negatives_t
    for step in range(FOLD_IN_STEPS):
        block = slice(step * FOLD_IN_NEGATIVES, (step + 1) * FOLD_IN_NEGATIVES)
        sampled = negatives.representations[block]
        query = base + fold
        margins = (positives @ query + positive_biases)[:, None] - (sampled @ query + negatives.biases[block])
        # sigmoid(-margin): how much each (item, negative) pair still pulls; clipped against overflow.
        pull = shares[:, None] / (1.0 + np.exp(np.clip(margins, -30.0, 30.0)))
        fold = decay * fold + rate * (pull.sum(axis=1) @ positives - pull.sum(axis=0) @ sampled)
        pulled = decay * pulled + pull.sum(axis=1)
        pushed = decay * pushed + pull @ sampled
    parts = decay**FOLD_IN_STEPS * start + rate * (pulled[:, None] * positives - pushed)
    return parts.astype(np.float32, copy=False)


_SCHEMES: weakref.WeakKeyDictionary[ServingModel, pb.FeatureScheme] = weakref.WeakKeyDictionary()


def feature_scheme(model: ServingModel) -> pb.FeatureScheme:
    """The FeatureScheme the model was trained with (its artefact's resolved options; the
    defaults for an artefact without them)."""
    found = _SCHEMES.get(model)
    if found is None:
        options = json_format.ParseDict(
            model.artefact.metadata.get("options", {}), pb.TrainingOptions(), ignore_unknown_fields=True
        )
        found = resolve_options(options).features
        _SCHEMES[model] = found
    return found


def attribute_weight(model: ServingModel) -> float:
    """The weight of one consented attribute the customer's learned row does not hold."""
    scheme = feature_scheme(model)
    return (1.0 - scheme.identity_weight) / max(1, len(scheme.customer_attributes))


def fold_in_weight(model: ServingModel, interaction: StoredInteraction) -> float:
    """An interaction's weight as an Evidence item: its training weight under the model's
    scheme (a purchase outweighs a view; 0 leaves it out)."""
    return interaction_weight(interaction, feature_scheme(model))


def _learned_weights(model: ServingModel, customer_id: str) -> dict[str, float]:
    """The customer's row of the model's customer feature matrix (empty when unknown)."""
    row = model.customer_rows.get(customer_id) if customer_id else None
    if row is None:
        return {}
    matrix = model.artefact.customer_features
    start, end = matrix.indptr[row], matrix.indptr[row + 1]
    names = model.artefact.customer_feature_names
    return {
        names[column]: float(weight)
        for column, weight in zip(matrix.indices[start:end], matrix.data[start:end], strict=True)
    }


def _feature_terms(model: ServingModel, evidence: Evidence) -> list[tuple[str, float, str]]:
    """(feature name, weight, data category) of each customer feature term."""
    learned = _learned_weights(model, evidence.customer_id)
    found: list[tuple[str, float, str]] = []
    identity = f"{IDENTITY_PREFIX}{evidence.customer_id}"
    if evidence.identity_category and identity in learned:
        found.append((identity, learned[identity], evidence.identity_category))
    default = attribute_weight(model)
    seen = {identity}
    for name, category in evidence.attributes:
        if name in model.customer_feature_rows and name not in seen:
            seen.add(name)
            found.append((name, learned.get(name, default), category))
    return found


def _folded_items(model: ServingModel, evidence: Evidence) -> list[tuple[int, float, str, str]]:
    """(item row, weight, data category, item id) of the newest known items, each item once."""
    found: dict[str, tuple[int, float, str, str]] = {}
    for item_id, weight, category in evidence.items:
        row = model.item_rows.get(item_id)
        if row is None or weight <= 0:
            continue
        if item_id in found:  # repeated: one term, the weights added, the newest category
            kept = found[item_id]
            found[item_id] = (row, kept[1] + weight, kept[2], item_id)
        elif len(found) < MAX_FOLDED_ITEMS:
            found[item_id] = (row, float(weight), category, item_id)
    return list(found.values())


def identity_first(features: list[tuple[str, float, str]]) -> bool:
    """Whether the customer's terms begin with their learned row."""
    return bool(features) and features[0][0].startswith(IDENTITY_PREFIX)


def _row_parts(model: ServingModel, evidence: Evidence, row: np.ndarray) -> list[tuple[str, str, np.ndarray]]:
    """(item id, data category, part) of the row's non-negative least-squares fit by the
    representations of evidence.row_items (each known item once, at most MAX_FOLDED_ITEMS);
    only the items with a positive weight."""
    chosen: dict[str, tuple[int, str]] = {}
    for item_id, category in evidence.row_items:
        found = model.item_rows.get(item_id)
        if found is not None and item_id not in chosen and len(chosen) < MAX_FOLDED_ITEMS:
            chosen[item_id] = (found, category)
    if not chosen:
        return []
    items = model.items[[found for found, _ in chosen.values()], :-1]  # [m, d]
    try:
        weights, _ = scipy.optimize.nnls(items.T.astype(np.float64), row.astype(np.float64))
    except (RuntimeError, ValueError):  # no convergence, or a non-finite row: the row stays whole
        return []
    return [
        (item_id, category, (weight * items[index]).astype(np.float32))
        for index, ((item_id, (_, category)), weight) in enumerate(
            zip(chosen.items(), weights.tolist(), strict=True)
        )
        if weight > 0
    ]


def customer_vector(
    model: ServingModel, evidence: Evidence, *, fold_in: FoldIn = pairwise_fold_in
) -> CustomerVector | None:
    """The customer's vector from `evidence`; None when nothing usable is known (cold start)."""
    features = _feature_terms(model, evidence)
    items = _folded_items(model, evidence)
    if not features and not items:
        return None
    artefact = model.artefact
    dimensions = model.dimensions
    representations = np.empty((len(features) + len(items), dimensions), dtype=np.float32)
    biases: list[float] = []
    for index, (name, weight, _) in enumerate(features):
        column = model.customer_feature_rows[name]
        representations[index] = weight * artefact.customer_feature_embeddings[column]
        biases.append(weight * float(artefact.customer_feature_biases[column]))
    explained = _row_parts(model, evidence, representations[0]) if identity_first(features) else []
    if explained:
        representations = np.concatenate(
            (
                representations[: len(features)],
                np.stack([part for _, _, part in explained]),
                representations[len(features) :],
            )
        )
        representations[0] -= representations[len(features) : len(features) + len(explained)].sum(axis=0)
        features = features + [(item_id, 0.0, category) for item_id, category, _ in explained]
        biases.extend([0.0] * len(explained))
    base = representations[: len(features)].sum(axis=0, dtype=np.float32)
    if items:
        rows = np.array([item[0] for item in items], dtype=np.int64)
        weights = np.array([item[1] for item in items], dtype=np.float32)
        known = identity_first(features)
        scale = KNOWN_CUSTOMER_FOLD_IN_SCALE if known else 1.0
        representations[len(features) :] = fold_in(model, base, rows, weights, scale)
        biases.extend([0.0] * len(items))
    first_explained = len(features) - len(explained)
    terms = tuple(
        Term(
            FEATURE if index < first_explained else ITEM,
            name,
            category,
            representations[index],
            biases[index],
        )
        for index, (name, _, category) in enumerate(features)
    ) + tuple(
        Term(ITEM, item_id, category, representations[len(features) + index], 0.0)
        for index, (_, _, category, item_id) in enumerate(items)
    )
    return CustomerVector(
        terms=terms,
        query=model.query_of(representations.sum(axis=0, dtype=np.float32)),
        bias=float(sum(biases)),
        data_categories=tuple(sorted({term.data_category for term in terms if term.data_category})),
        term_representations=representations,
    )
