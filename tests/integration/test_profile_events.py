"""Event ingestion through real gRPC, with a real consent service deciding collection."""

from __future__ import annotations

import asyncio
import time

import grpc
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.store import events as events_table
from shared.db import Database
from tests.conftest import field_violations, rpc_error
from tests.integration.test_consent_decisions import grant, withdraw

PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"


def stamp(seconds_ago: float = 60.0) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromMicroseconds(int((time.time() - seconds_ago) * 1_000_000))
    return value


def view(event_id: str, customer: str = "c-1", seconds_ago: float = 60.0) -> pb.Event:
    return pb.Event(
        event_id=event_id,
        customer_id=customer,
        channel=pb.CHANNEL_WEB,
        event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
        occur_time=stamp(seconds_ago),
        items=[pb.EventItem(item_id="beans-1", category_path=["kitchen", "coffee", "beans"])],
    )


def purchase(event_id: str, customer: str = "c-1", seconds_ago: float = 60.0) -> pb.Event:
    return pb.Event(
        event_id=event_id,
        customer_id=customer,
        channel=pb.CHANNEL_MOBILE_APP,
        event_type=pb.EVENT_TYPE_PURCHASE,
        occur_time=stamp(seconds_ago),
        order_id=f"o-{event_id}",
        value_micros=3_600_000_000,
        currency_code="JPY",
        items=[pb.EventItem(item_id="beans-1", category_path=["kitchen", "coffee", "beans"], quantity=1)],
    )


async def setup(consented_profile, database_url=None, categories=(PURCHASES, BROWSING)):
    profile, consent = await consented_profile(database_url)
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    for customer in ("c-1", "c-2"):
        await stub.CreateCustomer(
            pb.CreateCustomerRequest(
                request_id=f"create-{customer}",
                customer_id=customer,
                customer=pb.Customer(display_name="Ann", region="JP-13", language_code="ja"),
            ),
            metadata=profile.auth("service:storefront"),
        )
    granted = await consent_grpc.ConsentServiceStub(consent.channel).GrantConsent(
        grant(customer="c-1", categories=categories, request_id="g-c1"), metadata=consent.auth()
    )
    cache = profile.running.app.registrations[0].servicer.consent
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    return profile, consent, stub, cache


def stored_event_ids(database_url: str) -> set[str]:
    database = Database(database_url, "profile")
    try:
        return database.transaction(
            lambda c: {r.event_id for r in c.execute(sa.select(events_table.c.event_id))}
        )
    finally:
        database.close()


async def test_each_event_gets_its_own_answer(consented_profile, database_url):
    profile, _, stub, _ = await setup(consented_profile, database_url)
    batch = [
        view("e-1"),
        purchase("e-2"),
        view("e-1"),  # the same event again in the same batch
        pb.Event(
            event_id="e-3",
            customer_id="c-1",
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_SEARCH,
            occur_time=stamp(),
            search_query="decaf beans",
        ),  # search history not consented
        view("e-4", customer="c-2"),  # c-2 consented to nothing
        view("e-5", customer="nobody"),
        pb.Event(
            event_id="e-6",
            customer_id="c-1",
            channel=pb.CHANNEL_WEB,
            event_type=pb.EVENT_TYPE_PURCHASE,
            occur_time=stamp(-3600),
            items=[pb.EventItem(item_id="x", quantity=-1)],
        ),
    ]
    response = await stub.IngestEvents(
        pb.IngestEventsRequest(events=batch), metadata=profile.auth("service:storefront")
    )
    statuses = [r.status for r in response.results]
    assert statuses == [
        pb.EVENT_RESULT_STATUS_ACCEPTED,
        pb.EVENT_RESULT_STATUS_ACCEPTED,
        pb.EVENT_RESULT_STATUS_DUPLICATE,
        pb.EVENT_RESULT_STATUS_REJECTED_CONSENT,
        pb.EVENT_RESULT_STATUS_REJECTED_CONSENT,
        pb.EVENT_RESULT_STATUS_UNKNOWN_CUSTOMER,
        pb.EVENT_RESULT_STATUS_INVALID,
    ]
    assert response.results[3].data_category == "user.behavior.search_history"
    invalid = {v.field for v in response.results[6].violations}
    assert {"occur_time", "items[0].quantity", "order_id", "currency_code"} <= invalid
    again = await stub.IngestEvents(
        pb.IngestEventsRequest(events=[view("e-1"), purchase("e-2")]),
        metadata=profile.auth("service:storefront"),
    )
    assert [r.status for r in again.results] == [pb.EVENT_RESULT_STATUS_DUPLICATE] * 2
    url = database_url or _sqlite_url(profile)
    assert stored_event_ids(url) == {"e-1", "e-2"}


def _sqlite_url(service) -> str:
    return service.running.app.registrations[0].servicer.store.db.url


async def test_events_name_their_customer_by_any_linked_identifier(consented_profile):
    profile, consent, stub, cache = await setup(consented_profile)
    # c-3 is created with its loyalty card linked; it consents like c-1 does.
    await stub.CreateCustomer(
        pb.CreateCustomerRequest(
            request_id="create-c-3",
            customer_id="c-3",
            customer=pb.Customer(display_name="Ben"),
            identities=[pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="CARD-0042")],
        ),
        metadata=profile.auth("service:store"),
    )
    event = purchase("till-1", customer="ignored")
    event.identifier.CopyFrom(pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="CARD-0042"))
    event.channel = pb.CHANNEL_STORE
    event.event_type = pb.EVENT_TYPE_STORE_PURCHASE
    event.store_id = "store-7"
    unknown = purchase("till-2", customer="ignored")
    unknown.identifier.CopyFrom(pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value="CARD-9999"))
    response = await stub.IngestEvents(
        pb.IngestEventsRequest(events=[event, unknown]), metadata=profile.auth("service:store")
    )
    # c-3 has not consented yet: the card resolved to c-3, and collection was refused for it.
    assert [r.status for r in response.results] == [
        pb.EVENT_RESULT_STATUS_REJECTED_CONSENT,
        pb.EVENT_RESULT_STATUS_UNKNOWN_CUSTOMER,
    ]
    granted = await consent_grpc.ConsentServiceStub(consent.channel).GrantConsent(
        grant(customer="c-3", categories=[PURCHASES], request_id="g-c3"), metadata=consent.auth()
    )
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    again = await stub.IngestEvents(
        pb.IngestEventsRequest(events=[event]), metadata=profile.auth("service:store")
    )
    assert (
        again.results[0].status == pb.EVENT_RESULT_STATUS_ACCEPTED and again.results[0].customer_id == "c-3"
    )


async def test_a_withdrawal_stops_collection_at_once(consented_profile):
    profile, consent, stub, cache = await setup(consented_profile)
    writer = profile.auth("service:storefront")
    assert (await stub.IngestEvents(pb.IngestEventsRequest(events=[view("w-1")]), metadata=writer)).results[
        0
    ].status == (pb.EVENT_RESULT_STATUS_ACCEPTED)
    withdrawn = await consent_grpc.ConsentServiceStub(consent.channel).WithdrawConsent(
        withdraw(customer="c-1", categories=[BROWSING], request_id="w-browse"), metadata=consent.auth()
    )
    assert await cache.wait_for_revision(withdrawn.consent.revision, 1.0)
    after = await stub.IngestEvents(
        pb.IngestEventsRequest(events=[view("w-2"), purchase("w-3")]), metadata=writer
    )
    assert [r.status for r in after.results] == [
        pb.EVENT_RESULT_STATUS_REJECTED_CONSENT,
        pb.EVENT_RESULT_STATUS_ACCEPTED,
    ]


async def test_the_stream_answers_each_message_in_order(consented_profile, database_url):
    profile, _, stub, _ = await setup(consented_profile, database_url)

    async def messages():
        for batch in range(5):
            yield pb.StreamEventsRequest(
                events=[view(f"s-{batch}-{n}", seconds_ago=1000 - n) for n in range(50)]
            )

    answers = [a async for a in stub.StreamEvents(messages(), metadata=profile.auth("service:storefront"))]
    assert len(answers) == 5
    assert all(len(a.results) == 50 for a in answers)
    assert all(r.status == pb.EVENT_RESULT_STATUS_ACCEPTED for a in answers for r in a.results)
    assert [a.results[0].event_id for a in answers] == [f"s-{b}-0" for b in range(5)]
    assert len(stored_event_ids(database_url or _sqlite_url(profile))) == 250


async def test_a_stream_stores_an_event_repeated_across_its_messages_at_its_first_copy(
    consented_profile, database_url
):
    # The messages are sent without waiting for answers, so the service takes several in
    # at once; they still commit in the order they came.
    profile, _, stub, _ = await setup(consented_profile, database_url)

    async def messages():
        for batch in range(6):
            yield pb.StreamEventsRequest(events=[view("again"), purchase(f"own-{batch}")])

    answers = [a async for a in stub.StreamEvents(messages(), metadata=profile.auth("service:storefront"))]
    assert [[r.status for r in a.results] for a in answers] == [
        [pb.EVENT_RESULT_STATUS_ACCEPTED, pb.EVENT_RESULT_STATUS_ACCEPTED]
    ] + [[pb.EVENT_RESULT_STATUS_DUPLICATE, pb.EVENT_RESULT_STATUS_ACCEPTED]] * 5
    assert all(r.customer_id == "c-1" for a in answers for r in a.results)
    assert stored_event_ids(database_url or _sqlite_url(profile)) == {"again"} | {
        f"own-{n}" for n in range(6)
    }


async def test_a_bad_message_ends_the_stream_after_the_answers_before_it(consented_profile):
    profile, _, stub, _ = await setup(consented_profile)

    async def messages():
        yield pb.StreamEventsRequest(events=[view("first")])
        yield pb.StreamEventsRequest(events=[view("second")])
        yield pb.StreamEventsRequest(events=[view(f"h-{n}") for n in range(1001)])
        yield pb.StreamEventsRequest(events=[view("after")])

    call = stub.StreamEvents(messages(), metadata=profile.auth("service:storefront"))
    answers = []
    error = await rpc_error(_collect(call, answers))
    assert [a.results[0].event_id for a in answers] == ["first", "second"]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "events" in field_violations(error)
    assert stored_event_ids(_sqlite_url(profile)) == {"first", "second"}


async def _collect(call, answers: list) -> None:
    async for answer in call:
        answers.append(answer)


async def test_events_follow_a_merge_that_lands_between_their_lookup_and_their_commit(
    consented_profile, database_url
):
    profile, consent, stub, cache = await setup(consented_profile, database_url)
    granted = await consent_grpc.ConsentServiceStub(consent.channel).GrantConsent(
        grant(customer="c-2", categories=[PURCHASES, BROWSING], request_id="g-c2"), metadata=consent.auth()
    )
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    database = profile.running.app.registrations[0].servicer.ingestor.db
    read = database.read
    merged = []

    async def read_then_merge(work):
        # The customers are looked up; before the events are stored, c-1 is merged into c-2.
        found = await read(work)
        if not merged and getattr(work, "func", None) is not None and work.func.__name__ == "_resolve":
            merged.append(
                await stub.MergeCustomers(
                    pb.MergeCustomersRequest(
                        request_id="m-1", source_customer_id="c-1", target_customer_id="c-2"
                    ),
                    metadata=profile.auth("service:storefront"),
                )
            )
        return found

    database.read = read_then_merge
    reply = await stub.IngestEvents(
        pb.IngestEventsRequest(events=[view("m-view"), purchase("m-buy")]),
        metadata=profile.auth("service:crm"),
    )
    assert merged
    assert [(r.status, r.customer_id) for r in reply.results] == [
        (pb.EVENT_RESULT_STATUS_ACCEPTED, "c-2"),
        (pb.EVENT_RESULT_STATUS_ACCEPTED, "c-2"),
    ]
    stored = Database(database_url or _sqlite_url(profile), "profile")
    owners = stored.transaction(
        lambda c: dict(c.execute(sa.select(events_table.c.event_id, events_table.c.customer_id)).all())
    )
    stored.close()
    assert owners == {"m-view": "c-2", "m-buy": "c-2"}


async def test_late_and_out_of_order_events_keep_their_time(consented_profile):
    profile, _, stub, _ = await setup(consented_profile)
    old, new = view("late", seconds_ago=86_400 * 40), view("recent", seconds_ago=10)
    await stub.IngestEvents(
        pb.IngestEventsRequest(events=[new, old]), metadata=profile.auth("service:storefront")
    )
    database = Database(_sqlite_url(profile), "profile")
    times = database.transaction(
        lambda c: dict(c.execute(sa.select(events_table.c.event_id, events_table.c.occurred_at_us)).all())
    )
    database.close()
    assert (
        times["late"] == old.occur_time.ToMicroseconds()
        and times["recent"] == new.occur_time.ToMicroseconds()
    )


async def test_copies_of_one_event_from_many_clients_are_stored_once(consented_profile, database_url):
    profile, _, stub, _ = await setup(consented_profile, database_url)
    writer = profile.auth("service:storefront")
    replies = await asyncio.gather(
        *(
            stub.IngestEvents(
                pb.IngestEventsRequest(events=[purchase("race-1"), view(f"own-{n}")]), metadata=writer
            )
            for n in range(8)
        )
    )
    statuses = [r.results[0].status for r in replies]
    assert statuses.count(pb.EVENT_RESULT_STATUS_ACCEPTED) == 1
    assert statuses.count(pb.EVENT_RESULT_STATUS_DUPLICATE) == 7
    stored = stored_event_ids(database_url or _sqlite_url(profile))
    assert "race-1" in stored and len(stored) == 9


async def test_bad_batches_and_callers_are_refused(consented_profile):
    profile, _, stub, _ = await setup(consented_profile)
    empty = await rpc_error(stub.IngestEvents(pb.IngestEventsRequest(), metadata=profile.auth("service:crm")))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and "events" in field_violations(empty)
    huge = pb.IngestEventsRequest(events=[view(f"h-{n}") for n in range(1001)])
    too_many = await rpc_error(stub.IngestEvents(huge, metadata=profile.auth("service:crm")))
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "events" in field_violations(too_many)
    denied = await rpc_error(
        stub.IngestEvents(
            pb.IngestEventsRequest(events=[view("d-1")]), metadata=profile.auth("service:recommendation")
        )
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_without_fresh_consent_state_nothing_is_collected(start_service, dev_tokens):
    # No consent service at this address: the cache never syncs, so ingestion fails closed.
    profile = await start_service(
        "profile", consent_address="127.0.0.1:9", service_token=dev_tokens["service:profile"]
    )
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    error = await rpc_error(
        stub.IngestEvents(pb.IngestEventsRequest(events=[view("x")]), metadata=profile.auth())
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE
