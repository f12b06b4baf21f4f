"""The demo data generator: deterministic, valid for the contracts, and with the structure
the services are meant to find (segment preferences, purchase cadences, consent mix)."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from itertools import pairwise

import pytest
from najimi.profile.v1 import profile_service_pb2 as profile_pb

from services.demo_data import catalog_requests, customer_request, event_message, grant_requests
from services.demo_generator import (
    AUTOMATIC_ORDERING,
    DAY_US,
    EVENT_CATEGORY,
    LEGACY_ITEMS,
    PURCHASE_TYPES,
    SEGMENT_BY_NAME,
    SEGMENTS,
    DemoData,
    generate,
    median,
    purchase_intervals_days,
    under,
)
from services.profile.events import CATEGORY_OF_TYPE, check_event

END_US = 1_780_000_000 * 1_000_000  # a fixed end, so the data is the same on every run
ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
INTERACTIONS = {"PRODUCT_VIEW", "ADD_TO_CART", "PURCHASE", "STORE_PURCHASE", "SEARCH"}


@pytest.fixture(scope="module")
def data() -> DemoData:
    return generate(END_US)


def test_same_seed_and_end_give_the_same_data(data: DemoData) -> None:
    again = generate(END_US)
    assert again == data
    assert [e.event_id for e in again.events] == [e.event_id for e in data.events]


def test_another_seed_gives_other_data(data: DemoData) -> None:
    other = generate(END_US, seed=data.seed + 1, customers=20)
    assert [c.display_name for c in other.customers[3:]] != [c.display_name for c in data.customers[3:20]]
    assert {i.item_id for i in other.items} != {i.item_id for i in data.items}


def test_a_customer_does_not_depend_on_how_many_are_generated(data: DemoData) -> None:
    """Each customer has a random stream of their own: fewer customers, same first ones."""
    fewer = generate(END_US, customers=20)
    assert fewer.customers == data.customers[:20]
    ids = {c.customer_id for c in fewer.customers}
    assert fewer.events == tuple(e for e in data.events if e.customer_id in ids)


def test_sizes_ids_and_references(data: DemoData) -> None:
    assert len(data.customers) == 200 and len(data.items) == 500
    assert (data.end_us - data.start_us) // DAY_US == 182
    assert 15_000 <= len(data.events) <= 40_000  # months of events, loadable in seconds
    item_ids = [item.item_id for item in data.items]
    assert len(set(item_ids)) == len(item_ids)
    assert all(re.match(r"^[a-z0-9-]{1,128}$", i) for i in item_ids)
    assert {item.item_id for item in LEGACY_ITEMS} <= set(item_ids)
    customer_ids = [c.customer_id for c in data.customers]
    assert len(set(customer_ids)) == len(customer_ids) and all(ID.match(c) for c in customer_ids)
    assert customer_ids[:3] == ["demo-aiko", "demo-ben", "demo-chloe"]
    event_ids = [e.event_id for e in data.events]
    assert len(set(event_ids)) == len(event_ids) and all(ID.match(e) for e in event_ids)
    paths = {item.item_id: item.category_path for item in data.items}
    known = set(customer_ids)
    for event in data.events:
        assert event.customer_id in known
        assert data.start_us <= event.occurred_at_us < data.end_us
        for line in event.items:
            assert paths[line.item_id] == line.category_path
    # The category tree: several levels, each item's path 2 to 3 segments deep.
    assert {len(item.category_path) for item in data.items} <= {2, 3}
    assert len({item.category_path[0] for item in data.items}) >= 8
    assert len({item.category_path for item in data.items}) >= 40
    assert len({item.brand for item in data.items}) >= 40


def test_each_customers_events_are_in_time_order_and_within_their_activity(data: DemoData) -> None:
    for customer in data.customers:
        events = data.events_of(customer.customer_id)
        times = [e.occurred_at_us for e in events]
        assert times == sorted(times)
        assert all(customer.active_from_us <= t < customer.active_until_us for t in times)
    churned = [c for c in data.customers if c.active_until_us < data.end_us]
    joined_late = [c for c in data.customers if c.active_from_us > data.start_us]
    assert len(churned) >= 10 and len(joined_late) >= 10


def test_every_event_is_valid_for_the_profile_service(data: DemoData) -> None:
    """The profile service's own checks (services/profile/events.py) find nothing to reject."""
    for event in data.events:
        message = event_message(event)
        assert check_event(message, data.end_us) == [], event
        assert CATEGORY_OF_TYPE[message.event_type] == EVENT_CATEGORY[event.event_type]
    channels = Counter(e.channel for e in data.events)
    assert set(channels) == {"WEB", "MOBILE_APP", "STORE", "CALL_CENTER", "IOT_DEVICE"}
    types = Counter(e.event_type for e in data.events)
    assert set(types) == set(EVENT_CATEGORY)  # every event type occurs
    identified = Counter(message.WhichOneof("customer") for message in map(event_message, data.events))
    assert identified["identifier"] > 1000 and identified["customer_id"] > 1000


def test_events_name_their_customer_by_an_identifier_linked_at_creation(data: DemoData) -> None:
    linked = {}
    for customer in data.customers:
        request = customer_request(customer)
        linked.update({(i.type, i.value, i.issuer): customer.customer_id for i in request.identities})
    for event in data.events:
        message = event_message(event)
        if message.WhichOneof("customer") == "identifier":
            key = (message.identifier.type, message.identifier.value, message.identifier.issuer)
            assert linked[key] == event.customer_id


def _shares(data: DemoData, prefixes_of: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """customer segment -> {segment: share of the customer segment's item interactions that
    fall under that segment's prefixes}."""
    counts: dict[str, Counter[str]] = {s.name: Counter() for s in SEGMENTS}
    segment_of = {c.customer_id: c.segment for c in data.customers}
    for event in data.events:
        if event.event_type not in INTERACTIONS:
            continue
        counter = counts[segment_of[event.customer_id]]
        for line in event.items:
            counter["total"] += 1
            for name, prefixes in prefixes_of.items():
                counter[name] += any(under(line.category_path, prefix) for prefix in prefixes)
    return {
        name: {other: counter[other] / counter["total"] for other in prefixes_of}
        for name, counter in counts.items()
    }


def test_customers_of_a_segment_prefer_its_categories(data: DemoData) -> None:
    # Most of a segment's interactions fall in its preferred categories (which overlap
    # between segments: home office and coffee lovers both like coffee) ...
    preferred = _shares(data, {s.name: [p for p, _ in s.preferences] for s in SEGMENTS})
    for segment in SEGMENTS:
        assert preferred[segment.name][segment.name] >= 0.7, (segment.name, preferred[segment.name])
    # ... and each segment's first preference (printing, coffee, baby, health, pets) is
    # far more its own than any other segment's.
    first = _shares(data, {s.name: [s.preferences[0][0]] for s in SEGMENTS})
    for segment in SEGMENTS:
        own = first[segment.name][segment.name]
        others = [first[other.name][segment.name] for other in SEGMENTS if other is not segment]
        assert own >= 0.25 and own >= 2 * max(others), (segment.name, own, others)


def test_segments_differ_in_demographics_and_channels(data: DemoData) -> None:
    for segment in SEGMENTS:
        members = [c for c in data.customers if c.segment == segment.name]
        assert len(members) >= 25
        low, high = segment.birth_years
        assert all(low <= c.birth_year <= high for c in members)
    by_segment: dict[str, Counter[str]] = {s.name: Counter() for s in SEGMENTS}
    segment_of = {c.customer_id: c.segment for c in data.customers}
    for event in data.events:
        by_segment[segment_of[event.customer_id]][event.channel] += 1
    assert by_segment["young_families"]["MOBILE_APP"] > by_segment["young_families"]["WEB"]
    assert by_segment["home_office"]["WEB"] > by_segment["home_office"]["MOBILE_APP"]
    assert by_segment["pet_households"]["STORE"] > by_segment["wellness"]["STORE"]


def test_consumables_are_rebought_at_their_item_cadence(data: DemoData) -> None:
    intervals = purchase_intervals_days(data.events)
    # The examples: ink about every 30 days, coffee beans about every 14.
    ink = [d for (_, item), days in intervals.items() if item == "ink-black-xl" for d in days]
    beans = [d for (_, item), days in intervals.items() if item == "coffee-beans" for d in days]
    assert len(ink) >= 10 and 26 <= median(ink) <= 33
    assert len(beans) >= 10 and 12 <= median(beans) <= 16
    # Every consumable kept up by several customers is re-bought near its own cadence ...
    habitual = {(c.customer_id, h.item_id) for c in data.customers for h in c.habits}
    checked = 0
    for item in data.items:
        days = [
            d
            for (c, i), values in intervals.items()
            if i == item.item_id and (c, i) in habitual
            for d in values
        ]
        if item.cadence_days is None or len(days) < 8:
            continue
        checked += 1
        assert 0.8 * item.cadence_days <= median(days) <= 1.2 * item.cadence_days, (item, median(days))
    assert checked >= 20
    # ... and repeat purchases are mostly such habits, not chance.
    repeated = [key for key, days in intervals.items() if len(days) >= 2]
    assert sum(key in habitual for key in repeated) >= 0.9 * len(repeated)
    # Cadences differ from item to item (what a per-item cadence trait must tell apart).
    cadences = {item.cadence_days for item in data.items if item.cadence_days}
    assert min(cadences) <= 10 and max(cadences) >= 60


def test_each_habit_follows_the_customers_own_interval(data: DemoData) -> None:
    intervals = purchase_intervals_days(data.events)
    checked = 0
    for customer in data.customers:
        for habit in customer.habits:
            days = intervals.get((customer.customer_id, habit.item_id), [])
            if len(days) < 4:
                continue
            checked += 1
            assert abs(median(days) - habit.interval_days) <= 0.2 * habit.interval_days
            # Regular, not random: the spread is small against the interval.
            assert statistics.pstdev(days) <= 0.35 * habit.interval_days
    assert checked >= 150


def test_device_readings_fall_between_refills(data: DemoData) -> None:
    aiko = data.events_of("demo-aiko")
    readings = [
        (e.occurred_at_us, dict(e.properties)["level"])
        for e in aiko
        if e.event_type == "DEVICE_USAGE" and e.items[0].item_id == "ink-black-xl"
    ]
    orders = [e.occurred_at_us for e in aiko if e.event_type == "PURCHASE" and e.channel == "IOT_DEVICE"]
    assert len(readings) >= 20 and len(orders) >= 5
    ups = sum(1 for (_, a), (_, b) in pairwise(readings) if b > a + 5)
    downs = sum(1 for (_, a), (_, b) in pairwise(readings) if b < a)
    assert downs > 2 * ups and ups >= 4  # a saw tooth: mostly falling, a jump per new cartridge
    assert all(0.0 <= level <= 100.0 for _, level in readings)


def test_consent_mix(data: DemoData) -> None:
    customers = data.customers
    none = [c for c in customers if not c.consents]
    assert 5 <= len(none) <= 20 and any(c.customer_id == "demo-chloe" for c in none)
    recommending = [
        c for c in customers if any(g.purpose == "personalize.recommendations" for g in c.consents)
    ]
    assert len(recommending) >= 0.85 * len(customers)
    owners = [c for c in customers if c.devices]
    ordering = [c for c in owners if any(g.purpose == AUTOMATIC_ORDERING for g in c.consents)]
    assert len(owners) >= 30 and len(owners) - 10 <= len(ordering) < len(owners)
    assert not any(g.purpose == AUTOMATIC_ORDERING for c in customers if not c.devices for g in c.consents)
    # Some events are not consented to, so the profile service's enforcement shows.
    rejected = [e for e in data.events if e.data_category not in _collectable(data, e.customer_id)]
    assert 0.02 * len(data.events) <= len(rejected) <= 0.2 * len(data.events)


def _collectable(data: DemoData, customer_id: str) -> frozenset[str]:
    return next(c for c in data.customers if c.customer_id == customer_id).collectable_categories


def test_requests_carry_fixed_ids(data: DemoData) -> None:
    requests = [customer_request(c) for c in data.customers]
    assert [r.request_id for r in requests] == [f"demo-{c.customer_id}" for c in data.customers]
    assert all(ID.match(r.request_id) for r in requests)
    grants = [g for c in data.customers for g in grant_requests(c)]
    assert len({g.request_id for g in grants}) == len(grants) and all(ID.match(g.request_id) for g in grants)
    batches = catalog_requests(data.items)
    assert all(1 <= len(b.items) <= 1000 for b in batches)
    assert sum(len(b.items) for b in batches) == len(data.items)
    assert [b.request_id for b in batches] == [b.request_id for b in catalog_requests(data.items)]
    aiko = requests[0].customer
    assert aiko.birth_year == 1988 and aiko.region == "JP-13" and aiko.gender == profile_pb.GENDER_FEMALE


def test_purchases_are_priced_and_ordered(data: DemoData) -> None:
    for event in data.events:
        if event.event_type in PURCHASE_TYPES:
            assert event.order_id and event.currency_code == "JPY"
            assert event.value_micros == sum(line.unit_price_micros * line.quantity for line in event.items)
    orders = Counter(e.order_id for e in data.events if e.event_type in PURCHASE_TYPES)
    assert max(orders.values()) == 1  # one purchase event per order
    returned = {e.order_id for e in data.events if e.event_type == "RETURN"}
    assert returned <= set(orders)


def test_segment_table_is_consistent() -> None:
    assert abs(sum(s.share for s in SEGMENTS) - 1.0) < 1e-9
    assert set(SEGMENT_BY_NAME) == {s.name for s in SEGMENTS}
