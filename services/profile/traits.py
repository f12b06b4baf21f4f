"""Computed traits: what each event adds to a customer's aggregates, and the traits read from them.

Two halves, both pure (no SQL, no gRPC, no clock):

- `aggregates_of(events)` turns stored events into what they add to each customer's
  aggregates (services/profile/trait_store.py keeps them in tables, and the trait worker
  adds each new event once, in seq order). The aggregates do not depend on the time they
  are read at: decayed weights are kept at an anchor time and decayed further on read.
- `compute_traits(...)` reads one customer's aggregates at a given time, for the data
  categories the caller may use, into recency, frequency, monetary value, category
  affinities, item cadences and churn risk, each with a one-line explanation.

Choices the proto leaves to the service:

- Reporting currency (MonetaryTrait.currency_code): there is no configured currency, so
  it is the customer's most used one: the currency of most of their purchases in the
  window (ties: the larger spend, then the alphabetically first code); when they bought
  nothing in the window, the same over all their purchases. Orders in other currencies
  are not converted; the explanation says how many were left out.
- Category affinity is kept per full category path (["food", "coffee", "beans"] as
  one category, not also its parents), with the interaction weights of the feed (view
  1, inquiry 1, wish list 1.5, add to cart 2, purchase 4, rating the rating minus 2 for
  ratings of 3 or more), one interaction per item of an event, and a half-life of 30
  days (HALF_LIFE_US; the proto's default, not configurable yet).
- Churn risk is the chance that a customer who buys about every `m` days (the mean
  interval between their orders, needing two orders) has stopped, given `t` days
  without an order: with a prior BASE_CHURN = 0.1 that a customer has stopped right
  after an order, and a customer still buying taking more than `t` with probability
  exp(-t/m), score = 0.1 / (0.1 + 0.9 * exp(-t/m)). It is 0.1 just after an order, 0.5
  after m * ln 9 (about 2.2 usual intervals) and tends to 1. The trend of the
  customer's activity (the proto's second input) is not used yet.
- Data categories: the traits use purchase history (orders, returns, ratings: recency,
  frequency, monetary, cadence, churn, purchase and rating affinity) and browsing
  history (views, carts, wish lists, inquiries: affinity). `data_categories_withheld`
  lists those two when the service holds trait inputs of them (orders, interactions
  with categorised items) that the customer does not consent to for
  personalize.profiling; other categories (search history, store visits, device
  telemetry) are neither used nor reported as withheld.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from najimi.profile.v1 import profile_service_pb2 as pb

SECOND_US = 1_000_000
HOUR_US = 3600 * SECOND_US
DAY_US = 24 * HOUR_US
HALF_LIFE_US = 30 * DAY_US
DEFAULT_WINDOW_US = 365 * DAY_US
MIN_WINDOW_US = DAY_US
MAX_WINDOW_US = 730 * DAY_US
DEFAULT_MAX_CATEGORIES = 20
DEFAULT_MAX_ITEMS = 20
MAX_LIMIT = 100
BASE_CHURN = 0.1
MAX_GROWTH_EXPONENT = 1000.0  # 2^1000 is about 1e301, within a double

PROFILING = "personalize.profiling"
PURCHASE_HISTORY = "user.behavior.purchase_history"
BROWSING_HISTORY = "user.behavior.browsing_history"
# The data categories traits are computed from.
TRAIT_INPUTS = (PURCHASE_HISTORY, BROWSING_HISTORY)

# Longest values the aggregate tables hold; longer ones (which ingestion rejects) are skipped.
MAX_ITEM_ID = 128
MAX_STORE_ID = 64

PURCHASE, RETURN = "purchase", "return"
ORDER_TYPES: dict[int, str] = {
    pb.EVENT_TYPE_PURCHASE: PURCHASE,
    pb.EVENT_TYPE_STORE_PURCHASE: PURCHASE,
    pb.EVENT_TYPE_RETURN: RETURN,
}

# Interaction kinds, the event types they come from, and their weights (as in the feed).
VIEW, CART, WISHLIST, INQUIRY, BOUGHT, RATING = "view", "cart", "wishlist", "inquiry", "purchase", "rating"
INTERACTION_KINDS: dict[int, str] = {
    pb.EVENT_TYPE_PRODUCT_VIEW: VIEW,
    pb.EVENT_TYPE_ADD_TO_CART: CART,
    pb.EVENT_TYPE_ADD_TO_WISHLIST: WISHLIST,
    pb.EVENT_TYPE_PURCHASE: BOUGHT,
    pb.EVENT_TYPE_STORE_PURCHASE: BOUGHT,
    pb.EVENT_TYPE_RATING: RATING,
    pb.EVENT_TYPE_INQUIRY: INQUIRY,
    pb.EVENT_TYPE_DOCUMENT_REQUEST: INQUIRY,
}
INTERACTION_WEIGHTS = {VIEW: 1.0, INQUIRY: 1.0, WISHLIST: 1.5, CART: 2.0, BOUGHT: 4.0}
MIN_POSITIVE_RATING = 3.0
# How explanations name each kind: (singular, plural), in the order they are listed.
KIND_NAMES = {
    BOUGHT: ("purchase", "purchases"),
    RATING: ("rating", "ratings"),
    CART: ("cart add", "cart adds"),
    WISHLIST: ("wish-list add", "wish-list adds"),
    INQUIRY: ("inquiry", "inquiries"),
    VIEW: ("view", "views"),
}

CHANNEL_PLACES: dict[int, str] = {
    pb.CHANNEL_WEB: "online",
    pb.CHANNEL_MOBILE_APP: "in the app",
    pb.CHANNEL_STORE: "in a store",
    pb.CHANNEL_CALL_CENTER: "through the call centre",
    pb.CHANNEL_IOT_DEVICE: "by a connected device",
}


# -- what is stored -----------------------------------------------------------------------


# The values below are named tuples: immutable like frozen dataclasses, and several times
# cheaper to create, which counts when the trait worker turns thousands of events a second
# into them.


class StoredEvent(NamedTuple):
    """One row of `events`, with its payload decoded."""

    seq: int
    customer_id: str
    event_type: int
    channel: int
    data_category: str
    occurred_at_us: int
    value_micros: int
    currency_code: str
    event: pb.Event


class Decayed(NamedTuple):
    """A time-decayed sum, held as its value at `anchor_us`."""

    value: float
    anchor_us: int

    def at(self, now_us: int, half_life_us: int = HALF_LIFE_US) -> float:
        # Capped so that an anchor far ahead of `now_us` cannot overflow a float.
        return self.value * 2.0 ** min(MAX_GROWTH_EXPONENT, -(now_us - self.anchor_us) / half_life_us)

    def plus(self, other: Decayed, half_life_us: int = HALF_LIFE_US) -> Decayed:
        """The sum of both, anchored at the later anchor (so values stay bounded)."""
        anchor = max(self.anchor_us, other.anchor_us)
        return Decayed(self.at(anchor, half_life_us) + other.at(anchor, half_life_us), anchor)


class Order(NamedTuple):
    """A purchase or a return (its refund), for recency, frequency, monetary value and churn.

    Its fields are the columns of `trait_orders` after customer_id, in order."""

    seq: int
    kind: str  # PURCHASE or RETURN
    occurred_at_us: int
    value_micros: int
    currency_code: str
    channel: int
    store_id: str
    data_category: str


class ItemPurchase(NamedTuple):
    """One order of one item (however many units), for the item's cadence.

    Its fields are the columns of `trait_item_purchases` after customer_id, in order."""

    item_id: str
    seq: int
    occurred_at_us: int
    data_category: str


class AffinityStat(NamedTuple):
    """A customer's interactions of one kind with the items of one category."""

    category_path: tuple[str, ...]
    kind: str
    data_category: str
    interactions: int
    weight: Decayed
    last_at_us: int

    def plus(self, other: AffinityStat) -> AffinityStat:
        return AffinityStat(
            self.category_path,
            self.kind,
            other.data_category or self.data_category,
            self.interactions + other.interactions,
            self.weight.plus(other.weight),
            max(self.last_at_us, other.last_at_us),
        )


@functools.lru_cache(maxsize=4096)
def category_key(path: tuple[str, ...]) -> str:
    """A fixed-length key for a category path (paths may be long)."""
    return hashlib.sha256(category_path_text(path).encode()).hexdigest()


@functools.lru_cache(maxsize=4096)
def category_path_text(path: tuple[str, ...]) -> str:
    return json.dumps(list(path), ensure_ascii=False, separators=(",", ":"))


@dataclass
class CustomerAggregates:
    """Everything the traits of one customer are computed from."""

    orders: list[Order] = field(default_factory=list)
    item_purchases: list[ItemPurchase] = field(default_factory=list)
    # (category_path, kind) -> stat
    affinities: dict[tuple[tuple[str, ...], str], AffinityStat] = field(default_factory=dict)

    def add_affinity(self, stat: AffinityStat) -> None:
        key = (stat.category_path, stat.kind)
        known = self.affinities.get(key)
        self.affinities[key] = stat if known is None else known.plus(stat)

    def data_categories(self) -> set[str]:
        """The data categories of everything held here."""
        held = {o.data_category for o in self.orders} | {p.data_category for p in self.item_purchases}
        return held | {s.data_category for s in self.affinities.values()}


# -- what each event adds -------------------------------------------------------------------


def interaction_weight(kind: str, rating_value: float) -> float:
    """The weight of one interaction; 0 for one that says nothing positive (a low rating)."""
    if kind == RATING:
        return rating_value - 2.0 if rating_value >= MIN_POSITIVE_RATING else 0.0
    return INTERACTION_WEIGHTS[kind]


def add_event(aggregates: CustomerAggregates, stored: StoredEvent) -> None:
    """Adds what one event contributes to its customer's aggregates."""
    event, at, event_type, data_category = (
        stored.event,
        stored.occurred_at_us,
        stored.event_type,
        stored.data_category,
    )
    items = event.items
    order_kind = ORDER_TYPES.get(event_type)
    if order_kind is not None:
        aggregates.orders.append(
            Order(
                stored.seq,
                order_kind,
                at,
                max(0, stored.value_micros),
                stored.currency_code,
                stored.channel,
                event.store_id[:MAX_STORE_ID],
                data_category,
            )
        )
        if order_kind == PURCHASE:
            # One purchase per item and order, however many lines or units name it.
            for item_id in dict.fromkeys([item.item_id for item in items]):
                if 0 < len(item_id) <= MAX_ITEM_ID:
                    aggregates.item_purchases.append(ItemPurchase(item_id, stored.seq, at, data_category))
    kind = INTERACTION_KINDS.get(event_type)
    if kind is None:
        return
    weight = interaction_weight(kind, event.rating_value) if kind == RATING else INTERACTION_WEIGHTS[kind]
    if weight <= 0:
        return
    for item in items:
        path = tuple(item.category_path)
        if path:
            aggregates.add_affinity(AffinityStat(path, kind, data_category, 1, Decayed(weight, at), at))


def aggregates_of(events: Iterable[StoredEvent]) -> dict[str, CustomerAggregates]:
    """What `events` add to the aggregates of each of their customers."""
    found: dict[str, CustomerAggregates] = defaultdict(CustomerAggregates)
    for stored in events:
        add_event(found[stored.customer_id], stored)
    return dict(found)


# -- the traits ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recency:
    last_purchase_us: int
    days_since: int
    explanation: str


@dataclass(frozen=True)
class Frequency:
    purchase_count: int
    window_us: int
    explanation: str


@dataclass(frozen=True)
class Monetary:
    total_micros: int
    currency_code: str
    window_us: int
    explanation: str


@dataclass(frozen=True)
class Affinity:
    category_path: tuple[str, ...]
    score: float
    half_life_us: int
    explanation: str


@dataclass(frozen=True)
class Cadence:
    item_id: str
    mean_interval_us: int
    interval_stddev_us: int
    purchase_count: int
    last_purchase_us: int
    next_expected_us: int
    explanation: str


@dataclass(frozen=True)
class Churn:
    score: float
    explanation: str


@dataclass(frozen=True)
class Traits:
    customer_id: str
    computed_at_us: int
    recency: Recency | None = None
    frequency: Frequency | None = None
    monetary: Monetary | None = None
    affinities: list[Affinity] = field(default_factory=list)
    cadences: list[Cadence] = field(default_factory=list)
    churn: Churn | None = None
    data_categories_used: list[str] = field(default_factory=list)
    data_categories_withheld: list[str] = field(default_factory=list)


def compute_traits(
    customer_id: str,
    aggregates: CustomerAggregates,
    now_us: int,
    usable_categories: Iterable[str],
    window_us: int = DEFAULT_WINDOW_US,
    max_categories: int = DEFAULT_MAX_CATEGORIES,
    max_items: int = DEFAULT_MAX_ITEMS,
    half_life_us: int = HALF_LIFE_US,
) -> Traits:
    """The traits of one customer at `now_us`, from the aggregates of `usable_categories` only."""
    usable = set(usable_categories)
    orders = [o for o in aggregates.orders if o.data_category in usable]
    purchases = [o for o in orders if o.kind == PURCHASE]
    items = [p for p in aggregates.item_purchases if p.data_category in usable]
    stats = [s for s in aggregates.affinities.values() if s.data_category in usable]
    used = {o.data_category for o in orders} | {p.data_category for p in items}
    used |= {s.data_category for s in stats}
    held = aggregates.data_categories()
    return Traits(
        customer_id=customer_id,
        computed_at_us=now_us,
        recency=recency_of(purchases, now_us),
        frequency=frequency_of(purchases, now_us, window_us),
        monetary=monetary_of(orders, now_us, window_us),
        affinities=affinities_of(stats, now_us, max_categories, half_life_us),
        cadences=cadences_of(items, now_us, max_items),
        churn=churn_of(purchases, now_us),
        data_categories_used=sorted(used & set(TRAIT_INPUTS)),
        data_categories_withheld=sorted((held & set(TRAIT_INPUTS)) - usable),
    )


def recency_of(purchases: list[Order], now_us: int) -> Recency | None:
    if not purchases:
        return None
    last = max(purchases, key=lambda o: (o.occurred_at_us, o.seq))
    days = max(0, now_us - last.occurred_at_us) // DAY_US
    if last.store_id:
        place = f"in store {last.store_id}"
    else:
        place = CHANNEL_PLACES.get(last.channel, "")
    return Recency(
        last.occurred_at_us,
        days,
        f"Last bought {ago_text(now_us - last.occurred_at_us)}{', ' + place if place else ''}.",
    )


def frequency_of(purchases: list[Order], now_us: int, window_us: int) -> Frequency | None:
    if not purchases:
        return None
    start = now_us - window_us
    count = sum(1 for o in purchases if o.occurred_at_us >= start)
    return Frequency(count, window_us, f"{plural(count, 'order')} in the last {window_text(window_us)}.")


def monetary_of(orders: list[Order], now_us: int, window_us: int) -> Monetary | None:
    purchases = [o for o in orders if o.kind == PURCHASE]
    if not purchases:
        return None
    start = now_us - window_us
    in_window = [o for o in orders if o.occurred_at_us >= start]
    bought = [o for o in in_window if o.kind == PURCHASE]
    currency = reporting_currency(bought or purchases)
    spent = sum(o.value_micros for o in bought if o.currency_code == currency)
    refunded = sum(o.value_micros for o in in_window if o.kind == RETURN and o.currency_code == currency)
    counted = sum(1 for o in bought if o.currency_code == currency)
    left_out = len(bought) - counted
    explanation = (
        f"Spent {money_text(spent - refunded)} {currency} over {plural(counted, 'order')} "
        f"in the last {window_text(window_us)}"
    )
    if refunded:
        explanation += f", after {money_text(refunded)} {currency} of refunds"
    if left_out:
        explanation += f"; {plural(left_out, 'order')} in other currencies not counted"
    return Monetary(spent - refunded, currency, window_us, explanation + ".")


def reporting_currency(purchases: list[Order]) -> str:
    """The currency of most of `purchases`; ties go to the larger spend, then the first code."""
    counts: dict[str, int] = defaultdict(int)
    spend: dict[str, int] = defaultdict(int)
    for order in purchases:
        counts[order.currency_code] += 1
        spend[order.currency_code] += order.value_micros
    return min(counts, key=lambda code: (-counts[code], -spend[code], code))


def affinities_of(
    stats: list[AffinityStat], now_us: int, limit: int, half_life_us: int = HALF_LIFE_US
) -> list[Affinity]:
    scores: dict[tuple[str, ...], float] = defaultdict(float)
    counts: dict[tuple[str, ...], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    latest: dict[tuple[str, ...], int] = {}
    for stat in stats:
        path = stat.category_path
        scores[path] += stat.weight.at(now_us, half_life_us)
        counts[path][stat.kind] += stat.interactions
        latest[path] = max(latest.get(path, stat.last_at_us), stat.last_at_us)
    total = sum(scores.values())
    if total <= 0 or not math.isfinite(total):
        return []
    ranked = sorted(scores, key=lambda path: (-scores[path], path))[:limit]
    return [
        Affinity(
            path,
            scores[path] / total,
            half_life_us,
            f"{interactions_text(counts[path])} in {'/'.join(path)}; "
            f"the latest {ago_text(now_us - latest[path])}.",
        )
        for path in ranked
    ]


def cadences_of(purchases: list[ItemPurchase], now_us: int, limit: int) -> list[Cadence]:
    by_item: dict[str, list[ItemPurchase]] = defaultdict(list)
    for purchase in purchases:
        by_item[purchase.item_id].append(purchase)
    found = []
    for item_id, bought in by_item.items():
        if len(bought) < 2:
            continue
        times = [p.occurred_at_us for p in sorted(bought, key=lambda p: (p.occurred_at_us, p.seq))]
        intervals = [later - earlier for earlier, later in itertools.pairwise(times)]
        mean = round(statistics.fmean(intervals))
        stddev = round(statistics.pstdev(intervals))
        last = times[-1]
        due = last + mean
        timing = f"next due around {date_text(due)}" if due >= now_us else f"due since {date_text(due)}"
        found.append(
            Cadence(
                item_id,
                mean,
                stddev,
                len(times),
                last,
                due,
                f"Bought {len(times)} times, about every {span_text(mean)}; {timing}.",
            )
        )
    found.sort(key=lambda c: (c.next_expected_us, c.item_id))
    return found[:limit]


def churn_score(since_us: int, usual_interval_us: int) -> float:
    """The chance a customer who buys every `usual_interval_us` has stopped, `since_us` after an order."""
    usual = max(usual_interval_us, DAY_US)  # several orders a day would make every hour look long
    still_buying = (1 - BASE_CHURN) * math.exp(-max(0, since_us) / usual)
    return BASE_CHURN / (BASE_CHURN + still_buying)


def churn_of(purchases: list[Order], now_us: int) -> Churn | None:
    if len(purchases) < 2:
        return None  # no rhythm of the customer's own to measure against
    times = sorted(o.occurred_at_us for o in purchases)
    usual = (times[-1] - times[0]) // (len(times) - 1)
    since = max(0, now_us - times[-1])
    return Churn(
        churn_score(since, usual),
        f"No purchase for {span_text(since)} against a usual {span_text(usual)} between orders.",
    )


# -- text ------------------------------------------------------------------------------------


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    return f"{count} {singular if count == 1 else plural_form or singular + 's'}"


def list_text(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def interactions_text(counts: dict[str, int]) -> str:
    """ "4 purchases, 1 cart add and 11 views": the kinds in KIND_NAMES order."""
    return list_text([plural(counts[kind], *KIND_NAMES[kind]) for kind in KIND_NAMES if counts.get(kind)])


def window_text(window_us: int) -> str:
    """A window exactly: "365 days", "36 hours", "90000 seconds"."""
    for unit, name in ((DAY_US, "day"), (HOUR_US, "hour"), (SECOND_US, "second")):
        if window_us % unit == 0:
            return plural(window_us // unit, name)
    return f"{window_us / SECOND_US:g} seconds"


def span_text(span_us: int) -> str:
    """A duration in whole days ("28 days"), or hours below a day ("6 hours")."""
    if span_us >= DAY_US:
        return plural(round(span_us / DAY_US), "day")
    if span_us >= HOUR_US:
        return plural(round(span_us / HOUR_US), "hour")
    return "less than an hour"


def ago_text(span_us: int) -> str:
    if span_us < DAY_US:
        return "less than a day ago"
    return plural(span_us // DAY_US, "day") + " ago"


MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def date_text(at_us: int) -> str:
    """A UTC date such as "3 May 2025" (the same in every locale)."""
    try:
        day = dt.datetime.fromtimestamp(at_us / SECOND_US, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return "a date out of range"
    return f"{day.day} {MONTHS[day.month - 1]} {day.year}"


def money_text(micros: int) -> str:
    """An amount in units with thousands separators: "48,300", "12.5", "-1,000"."""
    units, fraction = divmod(abs(micros), 1_000_000)
    text = f"{units:,}"
    if fraction:
        text += "." + f"{fraction:06d}".rstrip("0")
    return ("-" if micros < 0 else "") + text
