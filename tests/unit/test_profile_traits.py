"""The trait computation (services/profile/traits.py), against expectations worked out by hand."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from najimi.profile.v1 import profile_service_pb2 as pb

from services.profile import traits
from services.profile.traits import (
    BROWSING_HISTORY,
    DAY_US,
    HOUR_US,
    PURCHASE_HISTORY,
    CustomerAggregates,
    Decayed,
    StoredEvent,
    aggregates_of,
    compute_traits,
)

NOW = int(dt.datetime(2025, 5, 1, tzinfo=dt.UTC).timestamp() * 1_000_000)
BOTH = (PURCHASE_HISTORY, BROWSING_HISTORY)
JPY = 1_000_000  # one yen in micros
CATEGORY = {
    pb.EVENT_TYPE_PRODUCT_VIEW: BROWSING_HISTORY,
    pb.EVENT_TYPE_ADD_TO_CART: BROWSING_HISTORY,
    pb.EVENT_TYPE_ADD_TO_WISHLIST: BROWSING_HISTORY,
    pb.EVENT_TYPE_INQUIRY: BROWSING_HISTORY,
    pb.EVENT_TYPE_REMOVE_FROM_CART: BROWSING_HISTORY,
    pb.EVENT_TYPE_SEARCH: "user.behavior.search_history",
    pb.EVENT_TYPE_STORE_VISIT: "user.behavior.store_visits",
    pb.EVENT_TYPE_PURCHASE: PURCHASE_HISTORY,
    pb.EVENT_TYPE_STORE_PURCHASE: PURCHASE_HISTORY,
    pb.EVENT_TYPE_RATING: PURCHASE_HISTORY,
    pb.EVENT_TYPE_RETURN: PURCHASE_HISTORY,
}


def days_ago(days: float) -> int:
    return NOW - round(days * DAY_US)


def stored(
    seq: int,
    event_type: int,
    at_us: int,
    items: tuple[tuple[str, tuple[str, ...]], ...] = (),
    value: int = 0,
    currency: str = "",
    channel: int = pb.CHANNEL_WEB,
    store_id: str = "",
    rating: float = 0.0,
    customer: str = "c-1",
) -> StoredEvent:
    event = pb.Event(
        event_id=f"e-{seq}",
        event_type=event_type,  # type: ignore[arg-type]
        channel=channel,  # type: ignore[arg-type]
        items=[pb.EventItem(item_id=item, category_path=list(path)) for item, path in items],
        value_micros=value,
        currency_code=currency,
        store_id=store_id,
        rating_value=rating,
    )
    return StoredEvent(
        seq, customer, event_type, channel, CATEGORY[event_type], at_us, value, currency, event
    )


def purchase(seq: int, days: float, value: int, currency: str = "JPY", *items: str, **extra) -> StoredEvent:
    kind = pb.EVENT_TYPE_STORE_PURCHASE if extra.get("store_id") else pb.EVENT_TYPE_PURCHASE
    return stored(
        seq, kind, days_ago(days), tuple((item, ("food",)) for item in items), value, currency, **extra
    )


# -- decay ------------------------------------------------------------------------------------


def test_a_decayed_weight_halves_every_half_life():
    weight = Decayed(8.0, NOW)
    assert weight.at(NOW) == 8.0
    assert weight.at(NOW + 30 * DAY_US) == pytest.approx(4.0)
    assert weight.at(NOW + 60 * DAY_US) == pytest.approx(2.0)
    # Adding anchors at the later time: 4 a half-life old is 2 there, plus 4.
    total = Decayed(4.0, NOW).plus(Decayed(4.0, NOW + 30 * DAY_US))
    assert total.anchor_us == NOW + 30 * DAY_US and total.value == pytest.approx(6.0)
    # Order does not matter, and an anchor far ahead cannot overflow.
    assert Decayed(4.0, NOW + 30 * DAY_US).plus(Decayed(4.0, NOW)) == total
    assert math.isfinite(Decayed(1.0, NOW + 10**9 * DAY_US).at(NOW))


# -- what events add --------------------------------------------------------------------------


def test_each_event_adds_orders_item_purchases_affinities_and_category_counts():
    coffee, tea = ("food", "coffee"), ("food", "tea")
    events = [
        # Two lines of the same item: two interactions, one purchase of the item.
        stored(
            1,
            pb.EVENT_TYPE_PURCHASE,
            NOW,
            (("beans", coffee), ("beans", coffee), ("green", tea), ("cup", ())),
            value=3000 * JPY,
            currency="JPY",
        ),
        stored(2, pb.EVENT_TYPE_RATING, NOW, (("beans", coffee),), rating=4.5),
        stored(3, pb.EVENT_TYPE_RATING, NOW, (("green", tea),), rating=2.0),  # not positive: no weight
        stored(4, pb.EVENT_TYPE_RETURN, NOW, (("green", tea),), value=500 * JPY, currency="JPY"),
        stored(5, pb.EVENT_TYPE_ADD_TO_WISHLIST, NOW, (("green", tea),)),
        stored(6, pb.EVENT_TYPE_REMOVE_FROM_CART, NOW, (("green", tea),)),  # not an interaction
        stored(7, pb.EVENT_TYPE_SEARCH, NOW),
        stored(8, pb.EVENT_TYPE_PRODUCT_VIEW, NOW, (("beans", coffee),), customer="c-2"),
    ]
    found = aggregates_of(events)
    assert set(found) == {"c-1", "c-2"}
    mine = found["c-1"]
    assert [(o.seq, o.kind, o.value_micros) for o in mine.orders] == [
        (1, "purchase", 3000 * JPY),
        (4, "return", 500 * JPY),
    ]
    assert sorted((p.item_id, p.seq) for p in mine.item_purchases) == [("beans", 1), ("cup", 1), ("green", 1)]
    weights = {key: (s.interactions, s.weight.value) for key, s in mine.affinities.items()}
    assert weights == {
        (coffee, "purchase"): (2, 8.0),
        (tea, "purchase"): (1, 4.0),
        (coffee, "rating"): (1, 2.5),
        (tea, "wishlist"): (1, 1.5),
    }
    # The categories of trait inputs held (a search, or a removal from the cart, feeds no trait).
    assert mine.data_categories() == {PURCHASE_HISTORY, BROWSING_HISTORY}
    assert found["c-2"].affinities[(coffee, "view")].weight == Decayed(1.0, NOW)


# -- the traits ------------------------------------------------------------------------------------


def shopper() -> CustomerAggregates:
    """Eight purchases over 400 days (one in USD), one refund, a few repeat items."""
    events = [
        purchase(1, 400, 5000 * JPY, "JPY", "filter"),
        purchase(2, 100, 1000 * JPY, "JPY", "beans", "filter", "soap"),
        purchase(3, 80, 600 * JPY, "JPY", "soap"),
        purchase(4, 70, 2000 * JPY, "JPY", "beans", "tea"),
        purchase(5, 60, 700 * JPY, "JPY", "tea"),
        purchase(6, 40, 3000 * JPY, "JPY", "beans"),
        purchase(7, 20, 10 * 1_000_000, "USD", "tea", channel=pb.CHANNEL_MOBILE_APP),
        purchase(8, 10, 4000 * JPY, "JPY", "beans", "mug", channel=pb.CHANNEL_STORE, store_id="JP-13-004"),
        stored(9, pb.EVENT_TYPE_RETURN, days_ago(5), value=500 * JPY, currency="JPY"),
    ]
    return aggregates_of(events)["c-1"]


def test_recency_frequency_and_monetary_value():
    found = compute_traits("c-1", shopper(), NOW, BOTH)
    assert found.recency == traits.Recency(days_ago(10), 10, "Last bought 10 days ago, in store JP-13-004.")
    # All but the purchase 400 days ago.
    assert found.frequency == traits.Frequency(7, 365 * DAY_US, "7 orders in the last 365 days.")
    # JPY is the most used currency: 1000 + 600 + 2000 + 700 + 3000 + 4000 = 11,300, less the 500 refund.
    assert found.monetary == traits.Monetary(
        10_800 * JPY,
        "JPY",
        365 * DAY_US,
        "Spent 10,800 JPY over 6 orders in the last 365 days, after 500 JPY of refunds; "
        "1 order in other currencies not counted.",
    )


def test_a_shorter_window_counts_less():
    found = compute_traits("c-1", shopper(), NOW, BOTH, window_us=30 * DAY_US)
    # Within 30 days: the USD order 20 days ago and 4,000 JPY 10 days ago (one each: the larger
    # spend decides; 4,000 JPY > 10 USD in micros), and the 500 JPY refund.
    assert found.frequency is not None and found.frequency.purchase_count == 2
    assert found.monetary is not None
    assert (found.monetary.total_micros, found.monetary.currency_code) == (3500 * JPY, "JPY")
    assert found.monetary.explanation == (
        "Spent 3,500 JPY over 1 order in the last 30 days, after 500 JPY of refunds; "
        "1 order in other currencies not counted."
    )
    # Without a purchase in the window the currency comes from all purchases, and the total is 0.
    old = aggregates_of([purchase(1, 100, 1000 * JPY)])["c-1"]
    quiet = compute_traits("c-1", old, NOW, BOTH, window_us=30 * DAY_US)
    assert quiet.frequency is not None and quiet.frequency.explanation == "0 orders in the last 30 days."
    assert quiet.monetary is not None and (quiet.monetary.total_micros, quiet.monetary.currency_code) == (
        0,
        "JPY",
    )


def test_item_cadences_soonest_next_purchase_first():
    found = compute_traits("c-1", shopper(), NOW, BOTH, max_items=3)
    assert [
        (c.item_id, c.purchase_count, c.mean_interval_us // DAY_US, c.interval_stddev_us // DAY_US)
        for c in found.cadences
    ] == [
        ("soap", 2, 20, 0),  # 100 and 80 days ago: due 60 days ago
        ("tea", 3, 25, 15),  # 70, 60, 20 days ago: intervals 10 and 40
        ("beans", 4, 30, 0),  # 100, 70, 40, 10 days ago
        # "filter" (every 300 days, due in 200) is cut by max_items; "mug" was bought once.
    ]
    soap, tea, beans = found.cadences
    assert soap.last_purchase_us == days_ago(80) and soap.next_expected_us == days_ago(60)
    assert soap.explanation == "Bought 2 times, about every 20 days; due since 2 Mar 2025."
    assert tea.next_expected_us == days_ago(-5)
    assert tea.explanation == "Bought 3 times, about every 25 days; next due around 6 May 2025."
    assert beans.explanation == "Bought 4 times, about every 30 days; next due around 21 May 2025."
    everything = compute_traits("c-1", shopper(), NOW, BOTH)
    assert [c.item_id for c in everything.cadences] == ["soap", "tea", "beans", "filter"]
    assert (
        everything.cadences[-1].explanation
        == "Bought 2 times, about every 300 days; next due around 17 Nov 2025."
    )


def test_churn_risk_against_the_customers_own_rhythm():
    # 0.1 right after an order, 0.5 after ln 9 usual intervals, towards 1 after.
    month = 30 * DAY_US
    assert traits.churn_score(0, month) == pytest.approx(0.1)
    assert traits.churn_score(round(math.log(9) * month), month) == pytest.approx(0.5)
    assert traits.churn_score(10 * month, month) == pytest.approx(0.1 / (0.1 + 0.9 * math.exp(-10)))
    found = compute_traits("c-1", shopper(), NOW, BOTH)
    # Eight orders over 390 days: a usual 390/7 = 55.7 days; 10 days since the last.
    assert found.churn is not None
    assert found.churn.score == pytest.approx(0.1 / (0.1 + 0.9 * math.exp(-10 / (390 / 7))), rel=1e-6)
    assert found.churn.score == pytest.approx(0.1173, abs=1e-4)
    assert found.churn.explanation == "No purchase for 10 days against a usual 56 days between orders."
    # One order is no rhythm: no churn risk, although recency is known.
    single = compute_traits("c-1", aggregates_of([purchase(1, 3, 100 * JPY)])["c-1"], NOW, BOTH)
    assert single.churn is None and single.recency is not None and single.cadences == []


def browser() -> CustomerAggregates:
    coffee, home = ("food", "coffee"), ("home",)
    return aggregates_of(
        [
            stored(1, pb.EVENT_TYPE_PRODUCT_VIEW, NOW, (("beans", coffee),)),  # 1
            stored(2, pb.EVENT_TYPE_PURCHASE, days_ago(30), (("beans", coffee),), 1, "JPY"),  # 4 -> 2
            stored(3, pb.EVENT_TYPE_ADD_TO_CART, days_ago(60), (("lamp", home),)),  # 2 -> 0.5
            stored(4, pb.EVENT_TYPE_PRODUCT_VIEW, days_ago(30), (("lamp", home),)),  # 1 -> 0.5
        ]
    )["c-1"]


def test_category_affinities_decay_and_sum_to_one():
    found = compute_traits("c-1", browser(), NOW, BOTH)
    assert [(a.category_path, round(a.score, 9)) for a in found.affinities] == [
        (("food", "coffee"), 0.75),  # 1 + 2 of 4
        (("home",), 0.25),  # 0.5 + 0.5 of 4
    ]
    assert all(a.half_life_us == 30 * DAY_US for a in found.affinities)
    assert (
        found.affinities[0].explanation
        == "1 purchase and 1 view in food/coffee; the latest less than a day ago."
    )
    assert found.affinities[1].explanation == "1 cart add and 1 view in home; the latest 30 days ago."
    # Scores are shares of all categories, also of those cut by max_categories.
    [top] = compute_traits("c-1", browser(), NOW, BOTH, max_categories=1).affinities
    assert top.score == pytest.approx(0.75)
    # A month later everything has halved: the shares stay.
    later = compute_traits("c-1", browser(), NOW + 30 * DAY_US, BOTH)
    assert [round(a.score, 9) for a in later.affinities] == [0.75, 0.25]


def test_only_consented_categories_feed_the_traits():
    aggregates = browser()
    purchases_only = compute_traits("c-1", aggregates, NOW, [PURCHASE_HISTORY])
    [coffee] = purchases_only.affinities  # browsing (views, carts) left out: "home" had only those
    assert coffee.score == 1.0 and coffee.explanation == "1 purchase in food/coffee; the latest 30 days ago."
    assert purchases_only.recency is not None
    assert purchases_only.data_categories_used == [PURCHASE_HISTORY]
    assert purchases_only.data_categories_withheld == [BROWSING_HISTORY]

    browsing_only = compute_traits("c-1", aggregates, NOW, [BROWSING_HISTORY])
    assert browsing_only.recency is None and browsing_only.frequency is None
    assert browsing_only.monetary is None and browsing_only.churn is None
    assert [a.category_path for a in browsing_only.affinities] == [("food", "coffee"), ("home",)]
    assert [round(a.score, 9) for a in browsing_only.affinities] == [0.5, 0.5]  # 1 vs 0.5 + 0.5
    assert browsing_only.data_categories_used == [BROWSING_HISTORY]

    nothing = compute_traits("c-1", aggregates, NOW, [])
    assert nothing == traits.Traits("c-1", NOW, data_categories_withheld=[BROWSING_HISTORY, PURCHASE_HISTORY])
    # Categories the traits do not use are neither used nor withheld.
    visits = aggregates_of([stored(1, pb.EVENT_TYPE_STORE_VISIT, NOW)])["c-1"]
    assert compute_traits("c-1", visits, NOW, []) == traits.Traits("c-1", NOW)


def test_no_events_no_traits():
    assert compute_traits("c-1", CustomerAggregates(), NOW, BOTH) == traits.Traits("c-1", NOW)


# -- text ------------------------------------------------------------------------------------------


def test_amounts_spans_and_dates_read_naturally():
    assert traits.money_text(48_300 * JPY) == "48,300"
    assert traits.money_text(12_500_000) == "12.5"
    assert traits.money_text(-1_000_010_000) == "-1,000.01"
    assert traits.window_text(365 * DAY_US) == "365 days"
    assert traits.window_text(36 * HOUR_US) == "36 hours"
    assert traits.window_text(DAY_US + 1_000_000) == "86401 seconds"
    assert traits.span_text(DAY_US) == "1 day" and traits.span_text(3 * HOUR_US) == "3 hours"
    assert traits.ago_text(2 * HOUR_US) == "less than a day ago" and traits.ago_text(DAY_US) == "1 day ago"
    assert traits.date_text(NOW) == "1 May 2025"
    assert traits.date_text(10**20) == "a date out of range"
    assert (
        traits.reporting_currency(
            [
                traits.Order(1, "purchase", NOW, 100, "USD", 1, "", PURCHASE_HISTORY),
                traits.Order(2, "purchase", NOW, 100, "EUR", 1, "", PURCHASE_HISTORY),
            ]
        )
        == "EUR"
    )  # the same count and spend: the first code
