"""Timeline (ListEvents) and traits (GetTraits) through real gRPC, with a real consent service
deciding what may be shown, on SQLite and PostgreSQL. Events arrive through IngestEvents; the
trait worker is awaited up to the newest event, never slept for."""

from __future__ import annotations

import base64
import json
import math
import time
from dataclasses import dataclass

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile import trait_store
from services.profile.app import MIGRATIONS
from services.profile.events import CATEGORY_OF_TYPE
from services.profile.store import event_head, events
from services.profile.trait_rpcs import EVENT_DATA_CATEGORIES
from services.profile.trait_worker import TraitWorker
from services.profile.traits import DAY_US, StoredEvent, date_text
from shared.consent_cache import ConsentCache
from shared.db import Database, now_micros
from tests.conftest import InProcessService, error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import grant, withdraw

PROFILING = "personalize.profiling"
RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"
JPY = 1_000_000
WAIT = 10.0  # seconds the worker may take before a test fails (awaited, never slept)
COFFEE = ("food", "coffee")
KITCHEN = ("home", "kitchen")
CRM = "service:crm"


def stamp(at_us: int) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromMicroseconds(at_us)
    return value


def event(
    event_id: str,
    kind: int,
    at_us: int,
    items: tuple[tuple[str, tuple[str, ...]], ...] = (),
    customer: str = "c-1",
    channel: int = pb.CHANNEL_WEB,
    **fields,
) -> pb.Event:
    if kind in (pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_STORE_PURCHASE):
        fields.setdefault("order_id", f"o-{event_id}")
        fields.setdefault("value_micros", 1000 * JPY)
        fields.setdefault("currency_code", "JPY")
    if channel == pb.CHANNEL_STORE:
        fields.setdefault("store_id", "S-1")
    return pb.Event(
        event_id=event_id,
        customer_id=customer,
        channel=channel,  # type: ignore[arg-type]
        event_type=kind,  # type: ignore[arg-type]
        occur_time=stamp(at_us),
        items=[pb.EventItem(item_id=item, category_path=list(path)) for item, path in items],
        **fields,
    )


@dataclass
class Suite:
    profile: InProcessService
    consent: InProcessService
    stub: pb_grpc.ProfileServiceStub
    consent_stub: consent_grpc.ConsentServiceStub

    @property
    def servicer(self):
        return self.profile.running.app.registrations[0].servicer

    @property
    def cache(self) -> ConsentCache:
        return self.servicer.consent

    @property
    def worker(self) -> TraitWorker:
        return self.servicer.trait_worker

    @property
    def db(self) -> Database:
        return self.servicer.store.db

    async def create(self, customer_id: str) -> None:
        await self.stub.CreateCustomer(
            pb.CreateCustomerRequest(request_id=f"create-{customer_id}", customer_id=customer_id),
            metadata=self.profile.auth(CRM),
        )

    async def grant(self, customer: str = "c-1", purpose: str = PROFILING, categories=(PURCHASES, BROWSING)):
        granted = await self.consent_stub.GrantConsent(
            grant(
                customer=customer, purpose=purpose, categories=categories, request_id=f"g-{time.time_ns()}"
            ),
            metadata=self.consent.auth(),
        )
        assert await self.cache.wait_for_revision(granted.consent.revision, WAIT)

    async def withdraw(self, customer: str = "c-1", purpose: str = PROFILING, categories=()):
        withdrawn = await self.consent_stub.WithdrawConsent(
            withdraw(
                customer=customer, purpose=purpose, categories=categories, request_id=f"w-{time.time_ns()}"
            ),
            metadata=self.consent.auth(),
        )
        assert await self.cache.wait_for_revision(withdrawn.consent.revision, WAIT)

    async def ingest(self, *events: pb.Event) -> None:
        """Ingests `events` (all must be accepted) and waits until the traits include them."""
        response = await self.stub.IngestEvents(
            pb.IngestEventsRequest(events=events), metadata=self.profile.auth(CRM)
        )
        assert [r.status for r in response.results] == [pb.EVENT_RESULT_STATUS_ACCEPTED] * len(events)
        assert await self.worker.wait_until_processed(timeout=WAIT)

    async def traits(
        self, customer: str = "c-1", principal: str = "service:storefront", **request
    ) -> pb.Traits:
        response = await self.stub.GetTraits(
            pb.GetTraitsRequest(customer_id=customer, **request), metadata=self.profile.auth(principal)
        )
        return response.traits

    async def timeline(self, customer: str = "c-1", **request) -> tuple[list[str], str]:
        response = await self.stub.ListEvents(
            pb.ListEventsRequest(customer_id=customer, **request), metadata=self.profile.auth(CRM)
        )
        return [e.event_id for e in response.events], response.next_page_token


async def suite_of(consented_profile, database_url: str | None = None, customers=("c-1",)) -> Suite:
    profile, consent = await consented_profile(database_url)
    suite = Suite(
        profile,
        consent,
        pb_grpc.ProfileServiceStub(profile.channel),
        consent_grpc.ConsentServiceStub(consent.channel),
    )
    for customer in customers:
        await suite.create(customer)
    return suite


def days(count: float) -> int:
    return round(count * DAY_US)


# -- traits ------------------------------------------------------------------------------------------


async def test_traits_follow_the_events_as_they_arrive(consented_profile, database_url):
    suite = await suite_of(consented_profile, database_url)
    await suite.grant()
    base = now_micros()
    await suite.ingest(
        event("p1", pb.EVENT_TYPE_PURCHASE, base - days(70), (("beans", COFFEE),), value_micros=1000 * JPY),
        event("p2", pb.EVENT_TYPE_PURCHASE, base - days(40), (("beans", COFFEE),), value_micros=2000 * JPY),
        event(
            "p3",
            pb.EVENT_TYPE_STORE_PURCHASE,
            base - days(10),
            (("beans", COFFEE), ("mug", KITCHEN)),
            channel=pb.CHANNEL_STORE,
            value_micros=3000 * JPY,
        ),
        event("v1", pb.EVENT_TYPE_PRODUCT_VIEW, base - 3_600_000_000, (("beans", COFFEE),)),
        event("c1", pb.EVENT_TYPE_ADD_TO_CART, base - days(30), (("lamp", KITCHEN),)),
    )
    before = now_micros()
    traits = await suite.traits()
    assert traits.customer_id == "c-1"
    assert before <= traits.compute_time.ToMicroseconds() <= now_micros()

    assert traits.recency.last_purchase_time.ToMicroseconds() == base - days(10)
    assert traits.recency.days_since_last_purchase == 10
    assert traits.recency.explanation == "Last bought 10 days ago, in store S-1."
    assert traits.frequency.purchase_count == 3
    assert traits.frequency.window.ToTimedelta().days == 365
    assert traits.frequency.explanation == "3 orders in the last 365 days."
    assert (traits.monetary.total_micros, traits.monetary.currency_code) == (6000 * JPY, "JPY")
    assert traits.monetary.explanation == "Spent 6,000 JPY over 3 orders in the last 365 days."

    [beans] = traits.item_cadences  # the mug was bought once
    assert (beans.item_id, beans.purchase_count) == ("beans", 3)
    assert beans.mean_interval.ToMicroseconds() == days(30)
    assert beans.interval_stddev.ToMicroseconds() == 0
    assert beans.last_purchase_time.ToMicroseconds() == base - days(10)
    assert beans.next_expected_time.ToMicroseconds() == base + days(20)
    assert beans.explanation == (
        f"Bought 3 times, about every 30 days; next due around {date_text(base + days(20))}."
    )

    # Every order, 30 days apart; the last 10 days ago.
    assert traits.churn_risk.score == pytest.approx(0.1 / (0.1 + 0.9 * math.exp(-10 / 30)), abs=1e-4)
    assert traits.churn_risk.explanation == "No purchase for 10 days against a usual 30 days between orders."

    # Weights decayed by 2^(-age/30 days): purchases 4, views 1, carts 2.
    coffee = 4 * (2 ** (-70 / 30) + 2 ** (-40 / 30) + 2 ** (-10 / 30)) + 2 ** (-1 / 720)
    kitchen = 4 * 2 ** (-10 / 30) + 2 * 2 ** (-30 / 30)
    assert [tuple(a.category_path) for a in traits.category_affinities] == [COFFEE, KITCHEN]
    assert [a.score for a in traits.category_affinities] == pytest.approx(
        [coffee / (coffee + kitchen), kitchen / (coffee + kitchen)], abs=1e-6
    )
    assert all(a.half_life.ToTimedelta().days == 30 for a in traits.category_affinities)
    assert [a.explanation for a in traits.category_affinities] == [
        "3 purchases and 1 view in food/coffee; the latest less than a day ago.",
        "1 purchase and 1 cart add in home/kitchen; the latest 10 days ago.",
    ]
    assert list(traits.data_categories_used) == [BROWSING, PURCHASES]
    assert list(traits.data_categories_withheld) == []

    # A new purchase shows at once (once the worker has it), and the window and limits apply.
    await suite.ingest(event("p4", pb.EVENT_TYPE_PURCHASE, base - days(1), (("beans", COFFEE),)))
    later = await suite.traits(
        window=duration_pb2.Duration(seconds=30 * 86400), max_categories=1, max_items=1
    )
    assert later.recency.days_since_last_purchase == 1
    assert (
        later.frequency.purchase_count == 2 and later.frequency.explanation == "2 orders in the last 30 days."
    )
    assert later.monetary.total_micros == 4000 * JPY
    assert [tuple(a.category_path) for a in later.category_affinities] == [COFFEE]
    [beans] = later.item_cadences
    assert beans.purchase_count == 4 and beans.mean_interval.ToMicroseconds() == days(23)
    # Traits serve profiling: the recommender does not read them (shared/access_policy.py).
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await suite.traits(principal="service:recommendation")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_withdrawing_consent_hides_what_was_derived_from_it(consented_profile, database_url):
    suite = await suite_of(consented_profile, database_url)
    await suite.grant()
    await suite.grant(purpose=RECS, categories=(PURCHASES,))  # purchases stay collectable without profiling
    base = now_micros()
    await suite.ingest(
        event("p1", pb.EVENT_TYPE_PURCHASE, base - days(20), (("beans", COFFEE),)),
        event("p2", pb.EVENT_TYPE_PURCHASE, base - days(10), (("beans", COFFEE),)),
        event("v1", pb.EVENT_TYPE_PRODUCT_VIEW, base - days(1), (("lamp", KITCHEN),)),
    )
    full = await suite.traits()
    assert [tuple(a.category_path) for a in full.category_affinities] == [COFFEE, KITCHEN]
    assert (await suite.timeline())[0] == ["v1", "p2", "p1"]

    # Browsing withdrawn from profiling (and granted for nothing else): views leave the traits
    # and the timeline; purchase-based traits stay.
    await suite.withdraw(categories=[BROWSING])
    narrowed = await suite.traits()
    [coffee] = narrowed.category_affinities
    assert tuple(coffee.category_path) == COFFEE and coffee.score == pytest.approx(1.0)
    assert coffee.explanation == "2 purchases in food/coffee; the latest 10 days ago."
    assert narrowed.frequency.purchase_count == 2 and len(narrowed.item_cadences) == 1
    assert narrowed.HasField("churn_risk") and narrowed.HasField("recency")
    assert list(narrowed.data_categories_used) == [PURCHASES]
    assert list(narrowed.data_categories_withheld) == [BROWSING]
    assert (await suite.timeline())[0] == ["p2", "p1"]

    # No profiling at all: nothing personal, and the response says what it held back. The
    # purchases remain in the timeline: the recommendations consent still covers them.
    await suite.withdraw()
    bare = await suite.traits()
    assert bare.customer_id == "c-1" and bare.HasField("compute_time")
    for name in ("recency", "frequency", "monetary", "churn_risk"):
        assert not bare.HasField(name), name
    assert list(bare.category_affinities) == [] and list(bare.item_cadences) == []
    assert list(bare.data_categories_used) == []
    assert list(bare.data_categories_withheld) == [BROWSING, PURCHASES]
    assert (await suite.timeline())[0] == ["p2", "p1"]

    # Consent given again: what was collected counts again.
    await suite.grant()
    again = await suite.traits()
    assert len(again.category_affinities) == 2 and again.frequency.purchase_count == 2
    assert (await suite.timeline())[0] == ["v1", "p2", "p1"]


async def test_aggregates_resume_after_a_restart_without_counting_twice(
    consented_profile, start_service, dev_tokens, database_url
):
    suite = await suite_of(consented_profile, database_url)
    await suite.grant()
    base = now_micros()
    await suite.ingest(event("p1", pb.EVENT_TYPE_PURCHASE, base - days(20), (("beans", COFFEE),)))
    await suite.profile.running.stop(0)
    again = await start_service(
        "profile",
        database_url,
        consent_address=f"127.0.0.1:{suite.consent.running.port}",
        service_token=dev_tokens["service:profile"],
    )
    restarted = Suite(again, suite.consent, pb_grpc.ProfileServiceStub(again.channel), suite.consent_stub)
    assert await restarted.cache.wait_synced(WAIT)
    await restarted.ingest(event("p2", pb.EVENT_TYPE_PURCHASE, base - days(10), (("beans", COFFEE),)))
    traits = await restarted.traits()
    assert traits.frequency.purchase_count == 2
    [beans] = traits.item_cadences
    assert beans.purchase_count == 2 and beans.mean_interval.ToMicroseconds() == days(10)
    assert [a.explanation for a in traits.category_affinities] == [
        "2 purchases in food/coffee; the latest 10 days ago."
    ]


async def test_a_merged_customers_aggregates_are_rebuilt_under_the_target(consented_profile, database_url):
    suite = await suite_of(consented_profile, database_url, customers=("c-1", "c-2"))
    for customer in ("c-1", "c-2"):
        await suite.grant(customer=customer)
    base = now_micros()
    await suite.ingest(
        event("a1", pb.EVENT_TYPE_PURCHASE, base - days(30), (("beans", COFFEE),), customer="c-1"),
        event("b1", pb.EVENT_TYPE_PURCHASE, base - days(20), (("beans", COFFEE),), customer="c-2"),
    )
    # The worker stops: the next events stay after its cursor while the merge happens.
    await suite.worker.stop()
    response = await suite.stub.IngestEvents(
        pb.IngestEventsRequest(
            events=[
                event("a2", pb.EVENT_TYPE_PURCHASE, base - days(10), (("beans", COFFEE),), customer="c-1")
            ]
        ),
        metadata=suite.profile.auth(CRM),
    )
    assert response.results[0].status == pb.EVENT_RESULT_STATUS_ACCEPTED
    merged = await suite.stub.MergeCustomers(
        pb.MergeCustomersRequest(request_id="m-1", source_customer_id="c-1", target_customer_id="c-2"),
        metadata=suite.profile.auth(CRM),
    )
    assert merged.moved_event_count == 2
    # The target is rebuilt from its events up to the cursor (what MergeCustomers is to do in
    # its own transaction; rebuilding again changes nothing); those after it come through the
    # worker, once.
    await suite.db.write(lambda connection: trait_store.rebuild(connection, "c-2"))
    source_left = await suite.db.read(lambda connection: trait_store.load_aggregates(connection, "c-1"))
    assert source_left == trait_store.CustomerAggregates()
    rebuilt = await suite.traits("c-2")
    assert rebuilt.frequency.purchase_count == 2  # a1 and b1; a2 is still after the cursor
    suite.worker.start()
    assert await suite.worker.wait_until_processed(timeout=WAIT)
    traits = await suite.traits("c-2")
    assert traits.frequency.purchase_count == 3
    [beans] = traits.item_cadences
    assert beans.purchase_count == 3 and beans.mean_interval.ToMicroseconds() == days(10)
    assert [a.explanation for a in traits.category_affinities] == [
        "3 purchases in food/coffee; the latest 10 days ago."
    ]
    # The merged-away id has no traits and no timeline of its own.
    for call in (
        suite.stub.GetTraits(pb.GetTraitsRequest(customer_id="c-1"), metadata=suite.profile.auth(CRM)),
        suite.stub.ListEvents(pb.ListEventsRequest(customer_id="c-1"), metadata=suite.profile.auth(CRM)),
    ):
        error = await rpc_error(call)
        assert (
            error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "CUSTOMER_MERGED"
        )
    assert (await suite.timeline("c-2"))[0] == ["a2", "b1", "a1"]


async def test_erasing_traits_deletes_every_aggregate_row(consented_profile, database_url):
    suite = await suite_of(consented_profile, database_url)
    await suite.grant()
    base = now_micros()
    await suite.ingest(
        event("p1", pb.EVENT_TYPE_PURCHASE, base - days(2), (("beans", COFFEE),)),
        event("v1", pb.EVENT_TYPE_PRODUCT_VIEW, base - days(1), (("lamp", KITCHEN),)),
    )
    erased = await suite.db.write(lambda connection: trait_store.erase_traits(connection, "c-1"))
    assert erased == 1 + 1 + 2  # an order, an item purchase, two affinities
    left = await suite.db.read(lambda connection: trait_store.load_aggregates(connection, "c-1"))
    assert left == trait_store.CustomerAggregates()


def test_a_batch_read_before_a_rewrite_is_read_again(database_url):
    """The worker's two phases, on the database directly: a batch is written only if nothing
    moved the cursor or rewrote aggregates since it was read, and each event counts once."""
    database = Database(database_url, "profile", MIGRATIONS)
    database.migrate()
    base = now_micros()

    def insert(connection) -> None:
        for seq in (1, 2, 3):
            stored = event(f"e{seq}", pb.EVENT_TYPE_PURCHASE, base - days(seq), (("beans", COFFEE),))
            stored.resolved_customer_id, stored.data_category = "c-1", PURCHASES
            stored.receive_time.FromMicroseconds(base)
            connection.execute(
                events.insert().values(
                    seq=seq,
                    event_id=stored.event_id,
                    customer_id="c-1",
                    event_type=stored.event_type,
                    channel=stored.channel,
                    data_category=PURCHASES,
                    occurred_at_us=stored.occur_time.ToMicroseconds(),
                    received_at_us=base,
                    value_micros=stored.value_micros,
                    currency_code=stored.currency_code,
                    payload=stored.SerializeToString(),
                )
            )
        # Seqs 4 and 5 hold no event (a duplicate and a merge took them).
        connection.execute(event_head.update().values(seq=5))

    try:
        database.transaction(insert)
        batch = database.transaction(lambda c: trait_store.read_batch(c, 2), write=False)
        assert (batch.cursor, batch.last, batch.event_count) == (0, 2, 2)
        database.transaction(lambda c: trait_store.erase_traits(c, "someone-else"))  # a rewrite
        assert not database.transaction(lambda c: trait_store.write_batch(c, batch))
        batch = database.transaction(lambda c: trait_store.read_batch(c, 2), write=False)
        assert database.transaction(lambda c: trait_store.write_batch(c, batch))
        assert not database.transaction(lambda c: trait_store.write_batch(c, batch))  # not twice
        rest = database.transaction(lambda c: trait_store.read_batch(c, 2), write=False)
        assert (rest.cursor, rest.last, rest.event_count) == (2, 5, 1)  # on to the head
        assert database.transaction(lambda c: trait_store.write_batch(c, rest))
        assert database.transaction(trait_store.read_cursor) == 5
        held = database.transaction(lambda c: trait_store.load_aggregates(c, "c-1"), write=False)
        assert sorted(o.seq for o in held.orders) == [1, 2, 3]
        assert held.affinities[(COFFEE, "purchase")].interactions == 3
    finally:
        database.close()


def test_the_worker_takes_events_from_memory_only_while_they_are_as_stored(database_url):
    """The events of this process's commits (trait_store.Committed) are used instead of the
    table only when they follow on from the cursor and no rewrite came since their commit."""
    database = Database(database_url, "profile", MIGRATIONS)
    database.migrate()
    base = now_micros()
    stored = event("m1", pb.EVENT_TYPE_PURCHASE, base - days(1), (("beans", COFFEE),))
    stored.resolved_customer_id, stored.data_category = "c-1", PURCHASES
    row = {
        "event_id": "m1",
        "customer_id": "c-1",
        "event_type": stored.event_type,
        "channel": stored.channel,
        "data_category": PURCHASES,
        "occurred_at_us": stored.occur_time.ToMicroseconds(),
        "received_at_us": base,
        "value_micros": stored.value_micros,
        "currency_code": stored.currency_code,
        "payload": stored.SerializeToString(),
    }

    def insert(connection) -> None:
        connection.execute(events.insert().values(seq=1, **row))
        connection.execute(event_head.update().values(seq=2))  # seq 2: a duplicate, no event

    def in_memory(first: int, generation: int) -> trait_store.Committed:
        # The copy says c-2, the table c-1: the batch's customer tells where it came from.
        copy = StoredEvent(
            1, "c-2", row["event_type"], row["channel"], PURCHASES, row["occurred_at_us"], 0, "", stored
        )
        return trait_store.Committed(first, 2, generation, [copy])

    def customers_of(batch: trait_store.Batch) -> set[str]:
        return {order[0] for order in batch.rows["trait_orders"]}

    try:
        database.transaction(insert)
        generation = database.transaction(trait_store.cursor_generation)
        read = database.transaction(lambda c: trait_store.read_batch(c, 10, [in_memory(1, generation)]))
        assert (read.last, read.event_count, read.behind, customers_of(read)) == (2, 1, False, {"c-2"})
        gap = database.transaction(lambda c: trait_store.read_batch(c, 10, [in_memory(2, generation)]))
        assert customers_of(gap) == {"c-1"}  # seq 1 is not in memory: from the table
        database.transaction(lambda c: trait_store.erase_traits(c, "someone-else"))  # a rewrite
        stale = database.transaction(lambda c: trait_store.read_batch(c, 10, [in_memory(1, generation)]))
        assert (stale.last, customers_of(stale)) == (2, {"c-1"})
    finally:
        database.close()


# -- the timeline ------------------------------------------------------------------------------


async def test_list_events_newest_first_filtered_and_paged(consented_profile, database_url):
    suite = await suite_of(consented_profile, database_url)
    await suite.grant()
    base = now_micros()
    app, store = pb.CHANNEL_MOBILE_APP, pb.CHANNEL_STORE
    view, cart = pb.EVENT_TYPE_PRODUCT_VIEW, pb.EVENT_TYPE_ADD_TO_CART
    await suite.ingest(
        event("e1", view, base - days(6), (("beans", COFFEE),)),
        event("e2", cart, base - days(5), (("beans", COFFEE),), channel=app),
        event("e3", pb.EVENT_TYPE_PURCHASE, base - days(4), (("beans", COFFEE),)),
        event("e4", view, base - days(3), (("mug", KITCHEN),), channel=app),
        event("e5", pb.EVENT_TYPE_STORE_PURCHASE, base - days(2), (("mug", KITCHEN),), channel=store),
        event("e6", view, base - days(1), (("mug", KITCHEN),)),
        event("e7", view, base - days(1), (("lamp", KITCHEN),)),  # same time as e6, committed later
    )
    response = await suite.stub.ListEvents(
        pb.ListEventsRequest(customer_id="c-1", page_size=3), metadata=suite.profile.auth(CRM)
    )
    first = response.events[0]
    assert first.event_id == "e7" and first.resolved_customer_id == "c-1"
    assert first.data_category == BROWSING and first.HasField("receive_time")
    assert first.occur_time.ToMicroseconds() == base - days(1)
    assert [(i.item_id, list(i.category_path)) for i in first.items] == [("lamp", list(KITCHEN))]

    pages, token = [], ""
    while True:
        ids, token = await suite.timeline(page_size=3, page_token=token)
        pages.append(ids)
        if not token:
            break
    assert pages == [["e7", "e6", "e5"], ["e4", "e3", "e2"], ["e1"]]
    assert await suite.timeline(page_size=7) == (["e7", "e6", "e5", "e4", "e3", "e2", "e1"], "")

    assert (await suite.timeline(event_types=[view]))[0] == ["e7", "e6", "e4", "e1"]
    assert (await suite.timeline(channels=[app]))[0] == ["e4", "e2"]
    assert (await suite.timeline(event_types=[view, cart], channels=[pb.CHANNEL_WEB]))[0] == [
        "e7",
        "e6",
        "e1",
    ]
    # start_time is inclusive, end_time exclusive.
    window = {"start_time": stamp(base - days(4)), "end_time": stamp(base - days(2))}
    assert (await suite.timeline(**window))[0] == ["e4", "e3"]
    assert (await suite.timeline(start_time=stamp(base - days(2))))[0] == ["e7", "e6", "e5"]
    assert (await suite.timeline(end_time=stamp(base - days(5))))[0] == ["e1"]

    # A token only continues the listing it came from.
    ids, token = await suite.timeline(event_types=[view], page_size=2)
    assert ids == ["e7", "e6"] and token
    assert (await suite.timeline(event_types=[view], page_size=2, page_token=token))[0] == ["e4", "e1"]
    error = await rpc_error(suite.timeline(page_size=2, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(error)
    # ... of the same customer too.
    error = await rpc_error(suite.timeline("c-2", event_types=[view], page_size=2, page_token=token))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in field_violations(error)


async def test_unknown_merged_and_erased_customers(consented_profile):
    suite = await suite_of(consented_profile, customers=("c-1", "c-2", "c-3"))
    await suite.stub.MergeCustomers(
        pb.MergeCustomersRequest(request_id="m-1", source_customer_id="c-1", target_customer_id="c-2"),
        metadata=suite.profile.auth(CRM),
    )
    await privacy_grpc.DataSubjectServiceStub(suite.profile.channel).EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="c-3", request_id="dsr-1"),
        metadata=suite.profile.auth(),
    )
    for customer, code, reason in (
        ("nobody", grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND"),
        ("c-1", grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_MERGED"),
        ("c-3", grpc.StatusCode.NOT_FOUND, "CUSTOMER_ERASED"),
    ):
        for call in (
            suite.stub.GetTraits(pb.GetTraitsRequest(customer_id=customer), metadata=suite.profile.auth(CRM)),
            suite.stub.ListEvents(
                pb.ListEventsRequest(customer_id=customer), metadata=suite.profile.auth(CRM)
            ),
        ):
            error = await rpc_error(call)
            assert (error.code(), error_reason(error)) == (code, reason), customer
    # A customer without events or consent: no traits, nothing withheld, an empty timeline.
    traits = await suite.traits("c-2")
    assert traits.customer_id == "c-2" and not traits.HasField("recency")
    assert list(traits.data_categories_withheld) == []
    assert await suite.timeline("c-2") == ([], "")


async def test_stale_consent_state_fails_closed(start_service):
    # Nothing listens on the discard port: the consent cache never syncs.
    profile = await start_service("profile", consent_address="127.0.0.1:9")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    crm = profile.auth(CRM)
    await stub.CreateCustomer(pb.CreateCustomerRequest(request_id="r-1", customer_id="c-1"), metadata=crm)
    for call in (
        stub.GetTraits(pb.GetTraitsRequest(customer_id="c-1"), metadata=crm),
        stub.ListEvents(pb.ListEventsRequest(customer_id="c-1"), metadata=crm),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "CONSENT_STATE_STALE"


# -- bad input and access ---------------------------------------------------------------------------


def _token(filters: object, after: object) -> str:
    """A token as the service once wrote them: plain base64 JSON, which anyone could forge."""
    return base64.urlsafe_b64encode(json.dumps({"after": after, "filters": filters}).encode()).decode()


FIRST_PAGE_FILTERS = {"customer_id": "c-1", "event_types": [], "channels": [], "start": None, "end": None}


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"customer_id": ""}, {"customer_id"}),
        ({"customer_id": "has space"}, {"customer_id"}),
        ({"event_types": [99]}, {"event_types[0]"}),
        ({"event_types": [pb.EVENT_TYPE_PRODUCT_VIEW, 0]}, {"event_types[1]"}),
        ({"channels": [0]}, {"channels[0]"}),
        ({"start_time": stamp(10**6), "end_time": stamp(10**6)}, {"end_time"}),
        ({"start_time": timestamp_pb2.Timestamp(seconds=10**12)}, {"start_time"}),
        ({"end_time": timestamp_pb2.Timestamp(seconds=1, nanos=-1)}, {"end_time"}),
        ({"page_size": -1}, {"page_size"}),
        ({"page_size": 1001}, {"page_size"}),
        ({"page_token": "%%%"}, {"page_token"}),
        ({"page_token": _token(FIRST_PAGE_FILTERS, "x")}, {"page_token"}),
        ({"page_token": _token(FIRST_PAGE_FILTERS, [1.5, 2])}, {"page_token"}),
        ({"page_token": _token(FIRST_PAGE_FILTERS, [1, 2, 3])}, {"page_token"}),
        ({"page_token": _token({"customer_id": "c-2"}, [1, 2])}, {"page_token"}),
        ({"customer_id": "", "channels": [7], "page_size": -5}, {"customer_id", "channels[0]", "page_size"}),
    ],
)
async def test_list_events_bad_input_names_the_field(start_service, request_fields, fields):
    profile = await start_service("profile")
    request = pb.ListEventsRequest(customer_id="c-1")
    for name, value in request_fields.items():
        field = getattr(request, name)
        if isinstance(value, list):
            field.extend(value)
        elif isinstance(value, timestamp_pb2.Timestamp):
            field.CopyFrom(value)
        else:
            setattr(request, name, value)
    error = await rpc_error(
        pb_grpc.ProfileServiceStub(profile.channel).ListEvents(request, metadata=profile.auth())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == fields


@pytest.mark.parametrize(
    ("request_fields", "fields"),
    [
        ({"customer_id": ""}, {"customer_id"}),
        ({"window": duration_pb2.Duration(seconds=86399)}, {"window"}),
        ({"window": duration_pb2.Duration(seconds=731 * 86400)}, {"window"}),
        ({"window": duration_pb2.Duration(seconds=-86400)}, {"window"}),
        ({"window": duration_pb2.Duration(seconds=86400, nanos=-1)}, {"window"}),
        ({"window": duration_pb2.Duration()}, {"window"}),
        ({"max_categories": 101}, {"max_categories"}),
        ({"max_categories": -1}, {"max_categories"}),
        ({"max_items": 101}, {"max_items"}),
        ({"customer_id": "bad/id", "max_items": -3}, {"customer_id", "max_items"}),
    ],
)
async def test_get_traits_bad_input_names_the_field(start_service, request_fields, fields):
    profile = await start_service("profile")
    request = pb.GetTraitsRequest(customer_id="c-1")
    for name, value in request_fields.items():
        if isinstance(value, duration_pb2.Duration):
            request.window.CopyFrom(value)
        else:
            setattr(request, name, value)
    error = await rpc_error(
        pb_grpc.ProfileServiceStub(profile.channel).GetTraits(request, metadata=profile.auth())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == fields


async def test_windows_at_the_bounds_are_accepted(consented_profile):
    suite = await suite_of(consented_profile)
    for seconds in (86400, 730 * 86400):
        traits = await suite.traits(window=duration_pb2.Duration(seconds=seconds))
        assert traits.customer_id == "c-1"


@pytest.mark.parametrize(
    ("rpc", "principal"), [("ListEvents", "service:recommendation"), ("GetTraits", "service:campaign")]
)
async def test_callers_not_listed_are_refused(start_service, rpc, principal):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    request = (
        pb.ListEventsRequest(customer_id="c-1")
        if rpc == "ListEvents"
        else pb.GetTraitsRequest(customer_id="c-1")
    )
    error = await rpc_error(getattr(stub, rpc)(request, metadata=profile.auth(principal)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_timeline_knows_every_event_data_category():
    assert set(EVENT_DATA_CATEGORIES) == set(CATEGORY_OF_TYPE.values())
