"""Recommend and BatchRecommend: what may be used of a customer, the candidates, the ranking.

One request, in order:
1. The model: `ActiveModel.current()` once, so the whole answer comes from one version.
2. Consent (the shared consent cache, push-fed, so a withdrawal counts from the very next
   request): personalize.recommendations and the data categories it grants. An anonymous
   caller (no customer id) is not a customer: only the session items they send are used.
3. The customer's Evidence (customer_vectors.Evidence), each part under its category:
   - the learned row (identity), while the customer grants every behaviour category the
     model learned rows from;
   - their attributes (purpose-bound profile read, customer_attributes.py), each under its
     own category;
   - the fold-in: their consented interactions of the local copy stored since the model's
     training read its data (all of them when the row is not used), newest first, and the
     session's recent items (user.behavior.browsing_history);
   - with the row, their consented purchases stored before that (what the row was learned
     from), newest first: the row's parts along them are reasons of their own.
4. Candidates: the catalog's mask for the filter (available, not deleted, under the
   category prefixes; cached per filter), minus exclusions and, with exclude_purchased
   and a grant of purchase history, what the customer bought. A filter asked for again
   has its rows' vectors kept contiguous (serving_catalog.model_candidates): only those
   are scored, the blocked ones set aside (scorer.top_k_among).
5. Personalised: exact top-k (scorer), the diversity re-rank, reasons per item.
   Otherwise popular items within the same candidates, and the fallback reason, the first
   of ANONYMOUS, CONSENT_STALE, NO_CONSENT, NO_MODEL, COLD_START that applies.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.active_model import ActiveModel, LoadedModel
from services.recommendation.catalog import category_key, parse_category_prefix
from services.recommendation.customer_attributes import CustomerAttributeCache, attribute_features
from services.recommendation.customer_history import CustomerHistory, HistoryEntry
from services.recommendation.interactions import PURPOSE, StoredInteraction
from services.recommendation.serving.customer_vectors import (
    CustomerVector,
    Evidence,
    customer_vector,
    fold_in_weight,
)
from services.recommendation.serving.diversity import rerank
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.reasons import POPULAR, ScoreReason, reasons_for_rows
from services.recommendation.serving.scorer import top_k, top_k_among, top_k_many
from services.recommendation.serving_catalog import CatalogSnapshot, ServingCatalog, rows_of, without
from shared.consent_cache import ConsentCache
from shared.db import now_micros
from shared.validation import Violations, is_valid_id

BEHAVIOUR = "user.behavior."
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"

DEFAULT_K, MAX_K = 10, 100
DEFAULT_REASONS, MAX_REASONS = 3, 10
MAX_PREFIXES = 20
MAX_EXCLUDED = 1000
MAX_RECENT = 50
MAX_BATCH = 10_000
# The newest interactions folded into a customer's vector.
FOLD_IN_ITEMS = 50
# With diversity, MMR chooses among this many times k of the best candidates (at most MAX_POOL).
POOL_FACTOR, MAX_POOL = 5, 500
# Customers' vectors kept (VectorCache): a known customer's is small, one with 50 folded-in
# items about 14 KB at 64 dimensions (at most ~60 MB).
MAX_CACHED_VECTORS = 4096
# BatchRecommend scores this many customers per matrix product.
BATCH_CHUNK = 256


# -- options ------------------------------------------------------------------------------


class Options(NamedTuple):  # a tuple: made every request, at a third of a frozen dataclass's cost
    k: int = DEFAULT_K
    prefixes: tuple[str, ...] = ()  # category keys, "grocery/coffee/"
    excluded: frozenset[str] = frozenset()
    include_unavailable: bool = False
    exclude_purchased: bool = False
    diversity: float = 0.0
    max_reasons: int = DEFAULT_REASONS


def check_k(violations: Violations, field: str, k: int) -> int:
    violations.require_range(field, k, 0, MAX_K, f"must be 1 to {MAX_K}, or 0 for {DEFAULT_K}")
    return k or DEFAULT_K


def check_max_reasons(violations: Violations, field: str, value: int) -> int:
    violations.require_range(
        field, value, 0, MAX_REASONS, f"must be 1 to {MAX_REASONS}, or 0 for {DEFAULT_REASONS}"
    )
    return value or DEFAULT_REASONS


def check_ids(violations: Violations, field: str, ids: Sequence[str], most: int) -> None:
    if len(ids) > most:
        violations.add(field, f"must hold at most {most} ids, not {len(ids)}")
        return
    for index, item_id in enumerate(ids):
        if not is_valid_id(item_id):
            violations.require_id(f"{field}[{index}]", item_id)


# Filters a caller repeats (a storefront's page sends the same one again and again) are
# checked once: the valid ones are kept, at most MAX_CACHED_FILTERS, then the cache starts over.
MAX_CACHED_FILTERS = 1024
_checked_filters: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[tuple[str, ...], frozenset[str]]] = {}


def filter_of(
    violations: Violations, field: str, message: pb.ItemFilter
) -> tuple[tuple[str, ...], frozenset[str]]:
    """(category keys, excluded ids) of an ItemFilter."""
    key = (tuple(message.category_prefixes), tuple(message.exclude_item_ids))
    found = _checked_filters.get(key)
    if found is not None:
        return found
    before = len(violations.found)
    prefixes = message.category_prefixes
    keys: list[str] = []
    if len(prefixes) > MAX_PREFIXES:
        violations.add(f"{field}.category_prefixes", f"must hold at most {MAX_PREFIXES} prefixes")
    else:
        for index, text in enumerate(prefixes):
            name = f"{field}.category_prefixes[{index}]"
            if not text:
                violations.add(name, 'is required, e.g. "grocery/coffee"')
            keys.append(category_key(parse_category_prefix(name, text, violations)))
    check_ids(violations, f"{field}.exclude_item_ids", message.exclude_item_ids, MAX_EXCLUDED)
    found = (tuple(sorted(set(keys))), frozenset(message.exclude_item_ids))
    if len(violations.found) == before:
        if len(_checked_filters) >= MAX_CACHED_FILTERS:
            _checked_filters.clear()
        _checked_filters[key] = found
    return found


def options_of(violations: Violations, field: str, message: pb.RecommendOptions) -> Options:
    """The options as sent, checked (each fault named); defaults resolved."""
    k, diversity, max_reasons, item_filter = message.k, message.diversity, message.max_reasons, message.filter
    if 0 <= k <= MAX_K and 0 <= max_reasons <= MAX_REASONS and 0 <= diversity <= 1:  # NaN fails
        prefixes, excluded = filter_of(violations, f"{field}.filter", item_filter)
    else:  # each fault named, in field order
        check_k(violations, f"{field}.k", k)
        prefixes, excluded = filter_of(violations, f"{field}.filter", item_filter)
        if not (math.isfinite(diversity) and 0 <= diversity <= 1):
            violations.add(f"{field}.diversity", "must be a finite number from 0 to 1")
        check_max_reasons(violations, f"{field}.max_reasons", max_reasons)
    return Options(
        k or DEFAULT_K,
        prefixes,
        excluded,
        item_filter.include_unavailable,
        message.exclude_purchased,
        diversity,
        max_reasons or DEFAULT_REASONS,
    )


def check_batch(violations: Violations, field: str, customer_ids: Sequence[str]) -> None:
    if not customer_ids or len(customer_ids) > MAX_BATCH:
        violations.add(field, f"must hold 1 to {MAX_BATCH} ids, not {len(customer_ids)}")
        return
    first: dict[str, int] = {}
    for index, customer_id in enumerate(customer_ids):
        if not is_valid_id(customer_id):
            violations.require_id(f"{field}[{index}]", customer_id)
        elif customer_id in first:
            violations.add(f"{field}[{index}]", f"duplicates {field}[{first[customer_id]}]")
        else:
            first[customer_id] = index


# -- results ------------------------------------------------------------------------------


class Recommended(NamedTuple):  # a tuple: cheaper to make than a frozen dataclass
    item_id: str
    score: float
    reasons: tuple[ScoreReason, ...]


_new = tuple.__new__


class Recommendations(NamedTuple):
    customer_id: str
    items: list[Recommended]
    model_version: str
    personalized: bool
    fallback: int  # pb.FallbackReason
    data_categories: tuple[str, ...]
    consent_revision: int
    serve_time_us: int
    recommendation_id: str


@dataclass
class Plan:
    """What may be used of one customer in one request."""

    customer_id: str
    fallback: int = pb.FALLBACK_REASON_NONE
    consent_revision: int = 0
    evidence: Evidence | None = None
    vector: CustomerVector | None = None
    purchased: frozenset[str] = frozenset()
    categories: set[str] = field(default_factory=set)  # used besides the vector's (the mask's)
    row_categories: tuple[str, ...] = ()  # what the learned row rests on, when it is used


def _row_category(model: LoadedModel) -> str:
    """The category a reason resting on the learned row names: purchase history when the
    model learned from it (data_categories_used lists every one the row rests on)."""
    return PURCHASES if PURCHASES in model.identity_categories else model.identity_categories[0]


def _fold_weight(model: LoadedModel, entry: HistoryEntry) -> float:
    """The entry's weight as training weighed it (customer_vectors.fold_in_weight)."""
    return fold_in_weight(
        model.serving,
        StoredInteraction(
            "",
            entry.item_id,
            entry.interaction_type,
            entry.weight,
            0,
            "",
            profile_pb.CHANNEL_UNSPECIFIED,
            entry.data_category,
        ),
    )


class VectorCache:
    """Customers' vectors by (model, Evidence): a vector is a pure function of the two, and
    the Evidence holds everything it rests on (the consented row, attributes and items, each
    under its category), so a consent change, a fold-in, an erasure or a new model makes a
    new key and is never served from an old entry. Holds one model's vectors (cleared when
    the served model changes) and at most MAX_CACHED_VECTORS of them, oldest used out first."""

    def __init__(self, most: int = MAX_CACHED_VECTORS):
        self.most = most
        self._model: ServingModel | None = None
        self._held: OrderedDict[Evidence, CustomerVector | None] = OrderedDict()

    def of(self, model: ServingModel, evidence: Evidence) -> CustomerVector | None:
        if model is not self._model:
            self._held.clear()
            self._model = model
        try:
            found = self._held[evidence]
            self._held.move_to_end(evidence)
            return found
        except KeyError:
            pass
        found = customer_vector(model, evidence)
        self._held[evidence] = found
        if len(self._held) > self.most:
            self._held.popitem(last=False)
        return found


class Recommender:
    def __init__(
        self,
        active: ActiveModel,
        catalog: ServingCatalog,
        consent: ConsentCache,
        history: CustomerHistory,
        attributes: CustomerAttributeCache,
        max_staleness_seconds: float,
    ):
        self.active = active
        self.catalog = catalog
        self.consent = consent
        self.history = history
        self.attributes = attributes
        self.max_staleness_seconds = max_staleness_seconds
        self.vectors = VectorCache()

    # -- what may be used ---------------------------------------------------------------

    async def plan(
        self, model: LoadedModel | None, customer_id: str, options: Options, recent: Sequence[str] = ()
    ) -> Plan:
        if not customer_id:
            plan = Plan("", fallback=pb.FALLBACK_REASON_ANONYMOUS)
            if model is not None and recent:
                weight = self._session_weight(model)
                plan.evidence = Evidence(
                    items=tuple((item_id, weight, BROWSING) for item_id in recent[:MAX_RECENT])
                )
                plan.vector = self.vectors.of(model.serving, plan.evidence)
            return plan
        decision = self.consent.check_fresh(customer_id, PURPOSE, (), self.max_staleness_seconds)
        if decision is None:
            return Plan(
                customer_id, fallback=pb.FALLBACK_REASON_CONSENT_STALE, consent_revision=self.consent.revision
            )
        plan = Plan(customer_id, consent_revision=decision.revision)
        if not decision.allowed:
            plan.fallback = pb.FALLBACK_REASON_NO_CONSENT
            return plan
        granted = frozenset(decision.allowed_categories)
        history: tuple[HistoryEntry, ...] = ()
        if any(category.startswith(BEHAVIOUR) for category in granted):
            history = await self.history.of(customer_id)
        if options.exclude_purchased and PURCHASES in granted:
            plan.purchased = frozenset(
                e.item_id
                for e in history
                if e.interaction_type == profile_pb.INTERACTION_TYPE_PURCHASE and e.data_category == PURCHASES
            )
            plan.categories.add(PURCHASES)
        if model is None:
            plan.fallback = pb.FALLBACK_REASON_NO_MODEL
            return plan
        plan.evidence = await self._evidence(model, customer_id, granted, history, recent)
        if plan.evidence.identity_category:
            plan.row_categories = model.identity_categories
        plan.vector = self.vectors.of(model.serving, plan.evidence)
        if plan.vector is None:
            plan.fallback = pb.FALLBACK_REASON_COLD_START
        return plan

    async def _evidence(
        self,
        model: LoadedModel,
        customer_id: str,
        granted: frozenset[str],
        history: Sequence[HistoryEntry],
        recent: Sequence[str],
    ) -> Evidence:
        known = customer_id in model.serving.customer_rows and not self.active.is_erased(model, customer_id)
        row_usable = known and granted.issuperset(model.identity_categories)
        customer = await self.attributes.of(customer_id)
        attributes = tuple(
            (name, category)
            for name, category in attribute_features(customer, model.scheme.customer_attributes)
            if category in granted
        )
        items: list[tuple[str, float, str]] = []
        if BROWSING in granted:
            weight = self._session_weight(model)
            items.extend((item_id, weight, BROWSING) for item_id in recent[:MAX_RECENT])
        learned: list[tuple[str, str]] = []  # purchases the row was learned from
        for entry in history:
            if entry.data_category not in granted:
                continue
            if not row_usable or entry.stored_at_us >= model.fresh_after_us:
                if len(items) < FOLD_IN_ITEMS and (weight := _fold_weight(model, entry)) > 0:
                    items.append((entry.item_id, weight, entry.data_category))
            elif (
                entry.interaction_type == profile_pb.INTERACTION_TYPE_PURCHASE
                and len(learned) < FOLD_IN_ITEMS
            ):
                learned.append((entry.item_id, entry.data_category))
        return Evidence(
            customer_id=customer_id if known else "",
            identity_category=_row_category(model) if row_usable else "",
            attributes=attributes,
            items=tuple(items),
            row_items=tuple(learned),
        )

    @staticmethod
    def _session_weight(model: LoadedModel) -> float:
        for entry in model.scheme.interaction_type_weights:
            if entry.interaction_type == "VIEW":
                return entry.weight
        return 1.0

    # -- ranking -----------------------------------------------------------------------

    def _ranked(
        self,
        model: LoadedModel,
        vector: CustomerVector,
        rows: np.ndarray,
        scores: np.ndarray,
        options: Options,
    ) -> list[Recommended]:
        serving = model.serving
        if options.diversity > 0:
            chosen = rerank(serving, rows, scores, options.k, options.diversity)
            score_of = dict(zip(rows.tolist(), scores.tolist(), strict=True))
            chosen_scores = [score_of[row] for row in chosen.tolist()]
        else:
            chosen = rows[: options.k]
            chosen_scores = scores[: options.k].tolist()
        reasons = reasons_for_rows(serving, vector, chosen, options.max_reasons)
        ids, bias = serving.item_ids, vector.bias
        return [
            _new(Recommended, (ids[row], score + bias, found))  # Recommended(...) at a third of the cost
            for row, score, found in zip(chosen.tolist(), chosen_scores, reasons, strict=True)
        ]

    def _pool(self, options: Options) -> int:
        return options.k if options.diversity <= 0 else min(MAX_POOL, options.k * POOL_FACTOR)

    def _popular(
        self, snapshot: CatalogSnapshot, options: Options, blocked: frozenset[str]
    ) -> list[Recommended]:
        allowed = without(
            snapshot.mask(options.prefixes, options.include_unavailable), snapshot.rows, blocked
        )
        found = []
        for row in snapshot.popular(allowed, options.k).tolist():
            score = float(snapshot.popularity[row])
            found.append(Recommended(snapshot.ids[row], score, (ScoreReason(POPULAR, "", "", score, ""),)))
        return found

    def _result(
        self, plan: Plan, model: LoadedModel | None, items: list[Recommended], personalised: bool
    ) -> Recommendations:
        categories = set(plan.categories)
        if personalised and plan.vector is not None:
            categories.update(plan.vector.data_categories)
            if any(term.name.startswith("customer:") for term in plan.vector.terms):
                categories.update(plan.row_categories)
        fallback = (
            plan.fallback
            if plan.fallback != pb.FALLBACK_REASON_NONE or personalised
            else pb.FALLBACK_REASON_COLD_START
        )
        return Recommendations(
            customer_id=plan.customer_id,
            items=items,
            model_version=model.version if model is not None and personalised else "",
            personalized=personalised,
            fallback=fallback,
            data_categories=tuple(sorted(categories)) if plan.customer_id or personalised else (),
            consent_revision=plan.consent_revision,
            serve_time_us=now_micros(),
            recommendation_id=os.urandom(16).hex(),  # as unique as uuid4, a fraction of its cost
        )

    def _answer(
        self, plan: Plan, model: LoadedModel | None, snapshot: CatalogSnapshot, options: Options
    ) -> Recommendations:
        blocked = options.excluded | plan.purchased
        if model is None or plan.vector is None:
            return self._result(plan, model, self._popular(snapshot, options, blocked), False)
        serving, pool = model.serving, self._pool(options)
        candidates = snapshot.model_candidates(serving, options.prefixes, options.include_unavailable)
        if candidates is not None:  # the filter's rows alone, less the blocked ones
            rows, scores = top_k_among(
                candidates, plan.vector.query, pool, rows_of(serving.item_rows, blocked)
            )
        else:
            allowed = without(
                snapshot.model_mask(serving, options.prefixes, options.include_unavailable),
                serving.item_rows,
                blocked,
            )
            rows, scores = top_k(serving, plan.vector.query, pool, allowed)
        return self._result(plan, model, self._ranked(model, plan.vector, rows, scores, options), True)

    # -- the RPCs' domain ---------------------------------------------------------------

    async def recommend(
        self, customer_id: str, options: Options, recent: Sequence[str] = ()
    ) -> Recommendations:
        model = self.active.current()
        plan = await self.plan(model, customer_id, options, recent)
        return self._answer(plan, model, self.catalog.snapshot(), options)

    async def recommend_many(
        self, customer_ids: Sequence[str], options: Options
    ) -> AsyncIterator[Recommendations]:
        """One answer per customer, in order, all from the model active at the call's start;
        personalised ones scored BATCH_CHUNK at a time in one matrix product."""
        model = self.active.current()
        for start in range(0, len(customer_ids), BATCH_CHUNK):
            chunk = customer_ids[start : start + BATCH_CHUNK]
            # The chunk's reads (history, attributes) overlap; the scoring is one product.
            plans = await asyncio.gather(*(self.plan(model, customer_id, options) for customer_id in chunk))
            snapshot = self.catalog.snapshot()
            scored = [index for index, plan in enumerate(plans) if plan.vector is not None]
            ranked: dict[int, list[Recommended]] = {}
            if model is not None and scored:
                shared = without(
                    snapshot.model_mask(model.serving, options.prefixes, options.include_unavailable),
                    model.serving.item_rows,
                    options.excluded,
                )
                allowed = shared
                if any(plans[index].purchased for index in scored):
                    allowed = np.stack(
                        [without(shared, model.serving.item_rows, plans[index].purchased) for index in scored]
                    )
                queries = np.stack([plans[index].vector.query for index in scored])  # type: ignore[union-attr]
                rows, scores = top_k_many(model.serving, queries, self._pool(options), allowed)
                for position, index in enumerate(scored):
                    vector = plans[index].vector
                    assert vector is not None
                    ranked[index] = self._ranked(model, vector, rows[position], scores[position], options)
            for index, plan in enumerate(plans):
                if index in ranked:
                    yield self._result(plan, model, ranked[index], True)
                else:
                    yield self._answer(plan, None if plan.vector is None else model, snapshot, options)
