"""The recommender's interaction feed (ListInteractions, WatchInteractions) through real gRPC,
with a real consent service deciding what may be served, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import timestamp_pb2
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from services.profile.interactions import Cursor
from services.profile.store import event_head, events
from shared.consent_cache import ConsentCache
from shared.db import Database, now_micros
from tests.conftest import InProcessService, error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import grant, withdraw

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"
RECOMMENDER = "service:recommendation"
WAIT = 10.0  # seconds a stream read may take before the test fails (never slept)


# -- events ---------------------------------------------------------------------------------


def stamp(seconds_ago: float) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromMicroseconds(int((time.time() - seconds_ago) * 1_000_000))
    return value


def event(
    event_id: str,
    customer: str,
    kind: int,
    items: tuple[str, ...] = (),
    seconds_ago: float = 600.0,
    **fields,
) -> pb.Event:
    if kind in (pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_STORE_PURCHASE):
        fields.setdefault("order_id", f"o-{event_id}")
        fields.setdefault("value_micros", 1_980_000_000)
        fields.setdefault("currency_code", "JPY")
    channel = fields.pop("channel", pb.CHANNEL_WEB)
    if channel == pb.CHANNEL_STORE or kind == pb.EVENT_TYPE_STORE_PURCHASE:
        channel = pb.CHANNEL_STORE
        fields.setdefault("store_id", "JP-13-004")
    return pb.Event(
        event_id=event_id,
        customer_id=customer,
        channel=channel,
        event_type=kind,
        occur_time=stamp(seconds_ago),
        items=[pb.EventItem(item_id=item, category_path=["kitchen", "coffee"]) for item in items],
        **fields,
    )


def view(event_id: str, customer: str = "c-1", item: str = "a") -> pb.Event:
    return event(event_id, customer, pb.EVENT_TYPE_PRODUCT_VIEW, (item,))


def purchase(event_id: str, customer: str = "c-1", items: tuple[str, ...] = ("b",)) -> pb.Event:
    return event(event_id, customer, pb.EVENT_TYPE_PURCHASE, items)


# -- the suite --------------------------------------------------------------------------------


@dataclass
class Suite:
    profile: InProcessService
    consent: InProcessService
    stub: pb_grpc.ProfileServiceStub
    consent_stub: consent_grpc.ConsentServiceStub

    @property
    def cache(self) -> ConsentCache:
        return self.profile.running.app.registrations[0].servicer.consent

    @property
    def database_url(self) -> str:
        return self.profile.running.app.registrations[0].servicer.store.db.url

    def cursor_text(self, cursor: Cursor) -> str:
        """`cursor` as this profile service issues it."""
        return self.profile.running.app.registrations[0].servicer.interactions.cursors.text(cursor)

    @property
    def recommender(self) -> tuple[tuple[str, str], ...]:
        return self.profile.auth(RECOMMENDER)

    async def grant(self, customer: str, categories=(PURCHASES, BROWSING), purpose: str = RECS) -> None:
        granted = await self.consent_stub.GrantConsent(
            grant(
                customer=customer, purpose=purpose, categories=categories, request_id=f"g-{time.time_ns()}"
            ),
            metadata=self.consent.auth(),
        )
        assert await self.cache.wait_for_revision(granted.consent.revision, 5)

    async def withdraw(self, customer: str, categories=(), purpose: str = RECS) -> None:
        withdrawn = await self.consent_stub.WithdrawConsent(
            withdraw(
                customer=customer, purpose=purpose, categories=categories, request_id=f"w-{time.time_ns()}"
            ),
            metadata=self.consent.auth(),
        )
        assert await self.cache.wait_for_revision(withdrawn.consent.revision, 5)

    async def ingest(self, *batch: pb.Event) -> list[int]:
        response = await self.stub.IngestEvents(
            pb.IngestEventsRequest(events=list(batch)), metadata=self.profile.auth("service:storefront")
        )
        return [result.status for result in response.results]

    async def list_all(
        self, since: str = "", page_size: int = 0
    ) -> tuple[list[pb.InteractionFeedEntry], str]:
        """Every entry after `since`, page by page; and the cursor to continue from."""
        entries: list[pb.InteractionFeedEntry] = []
        token = ""
        while True:
            page = await self.stub.ListInteractions(
                pb.ListInteractionsRequest(since_cursor=since, page_size=page_size, page_token=token),
                metadata=self.recommender,
            )
            assert page.resume_cursor
            assert page_size == 0 or len(page.entries) <= page_size
            entries += page.entries
            if not page.next_page_token:
                return entries, page.resume_cursor
            token = page.next_page_token


async def start_suite(consented_profile, database_url=None, customers_=("c-1", "c-2", "c-3")) -> Suite:
    profile, consent = await consented_profile(database_url)
    suite = Suite(
        profile,
        consent,
        pb_grpc.ProfileServiceStub(profile.channel),
        consent_grpc.ConsentServiceStub(consent.channel),
    )
    for customer in customers_:
        await suite.stub.CreateCustomer(
            pb.CreateCustomerRequest(request_id=f"create-{customer}", customer_id=customer),
            metadata=profile.auth("service:crm"),
        )
    return suite


def summary(entries: list[pb.InteractionFeedEntry]) -> list[tuple]:
    """What each entry says, in feed order: an interaction or a merge notice."""
    found: list[tuple] = []
    for entry in entries:
        if entry.HasField("interaction"):
            i = entry.interaction
            found.append(
                (i.event_id, i.customer_id, i.item_id, pb.InteractionType.Name(i.interaction_type), i.weight)
            )
        else:
            m = entry.customer_merge
            found.append(("merge", m.source_customer_id, m.target_customer_id))
    return found


async def read_until_heartbeat(stream) -> tuple[list[pb.InteractionFeedEntry], str]:
    """Entries until the first heartbeat (the watcher has caught up), and its resume cursor."""
    entries: list[pb.InteractionFeedEntry] = []
    while True:
        message = await asyncio.wait_for(stream.read(), WAIT)
        assert message is not grpc.aio.EOF
        assert message.resume_cursor
        if not message.entries:
            return entries, message.resume_cursor
        assert len(message.entries) <= 1000
        assert message.resume_cursor == message.entries[-1].cursor
        entries += message.entries


async def read_entries(stream) -> tuple[list[pb.InteractionFeedEntry], str]:
    """The next message that holds entries (skipping heartbeats)."""
    while True:
        message = await asyncio.wait_for(stream.read(), WAIT)
        assert message is not grpc.aio.EOF
        if message.entries:
            return list(message.entries), message.resume_cursor


def insert_event_directly(database_url: str, stored: pb.Event, customer: str, category: str) -> None:
    """Commits an event the way ingestion does (seq taken under the event_head row), from
    outside the server: as another replica would."""
    database = Database(database_url, "profile")

    def write(connection) -> None:
        connection.execute(event_head.update().where(event_head.c.id == 1).values(seq=event_head.c.seq + 1))
        seq = connection.execute(sa.select(event_head.c.seq).where(event_head.c.id == 1)).scalar_one()
        now = now_micros()
        stored.resolved_customer_id = customer
        stored.data_category = category
        stored.receive_time.FromMicroseconds(now)
        connection.execute(
            events.insert().values(
                seq=seq,
                event_id=stored.event_id,
                customer_id=customer,
                event_type=stored.event_type,
                channel=stored.channel,
                data_category=category,
                occurred_at_us=stored.occur_time.ToMicroseconds(),
                received_at_us=now,
                value_micros=stored.value_micros,
                currency_code=stored.currency_code,
                payload=stored.SerializeToString(),
            )
        )

    try:
        database.transaction(write)
    finally:
        database.close()


# -- tests -------------------------------------------------------------------------------------


async def test_the_feed_serves_consented_interactions_in_commit_order(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    # c-2 lets its browsing be collected for analytics, but not used for recommendations.
    await suite.grant("c-2", categories=(BROWSING,), purpose="analytics")
    statuses = await suite.ingest(
        view("e-1"),
        purchase("e-2", items=("b", "c")),
        view("e-3", customer="c-2"),
        event("e-4", "c-1", pb.EVENT_TYPE_RATING, ("b",), rating_value=4.5),
        event("e-5", "c-1", pb.EVENT_TYPE_RATING, ("c",), rating_value=2.0),  # negative: not emitted
        event("e-6", "c-1", pb.EVENT_TYPE_REMOVE_FROM_CART, ("a",)),  # not an interaction
        event("e-7", "c-1", pb.EVENT_TYPE_ADD_TO_CART, ("d",)),
        event("e-8", "c-1", pb.EVENT_TYPE_ADD_TO_WISHLIST, ("e",)),
        event("e-9", "c-1", pb.EVENT_TYPE_STORE_PURCHASE, ("f",)),
        event("e-10", "c-1", pb.EVENT_TYPE_INQUIRY, ("g",), channel=pb.CHANNEL_CALL_CENTER),
        event("e-11", "c-1", pb.EVENT_TYPE_DOCUMENT_REQUEST),  # names no item
    )
    assert statuses == [pb.EVENT_RESULT_STATUS_ACCEPTED] * 11

    entries, resume = await suite.list_all(page_size=2)
    assert summary(entries) == [
        ("e-1", "c-1", "a", "INTERACTION_TYPE_VIEW", 1.0),
        ("e-2", "c-1", "b", "INTERACTION_TYPE_PURCHASE", 4.0),
        ("e-2", "c-1", "c", "INTERACTION_TYPE_PURCHASE", 4.0),
        ("e-4", "c-1", "b", "INTERACTION_TYPE_RATING", 2.5),
        ("e-7", "c-1", "d", "INTERACTION_TYPE_ADD_TO_CART", 2.0),
        ("e-8", "c-1", "e", "INTERACTION_TYPE_ADD_TO_WISHLIST", 1.5),
        ("e-9", "c-1", "f", "INTERACTION_TYPE_PURCHASE", 4.0),
        ("e-10", "c-1", "g", "INTERACTION_TYPE_INQUIRY", 1.0),
    ]
    first = entries[0].interaction
    assert first.data_category == BROWSING and first.channel == pb.CHANNEL_WEB
    assert abs(first.occur_time.ToMicroseconds() - (time.time() - 600) * 1e6) < 60e6
    assert entries[6].interaction.channel == pb.CHANNEL_STORE
    assert entries[6].interaction.data_category == PURCHASES
    # One page gives the same as small pages, and every cursor is distinct.
    whole, whole_resume = await suite.list_all(page_size=1000)
    assert whole == entries and whole_resume == resume
    assert len({entry.cursor for entry in entries}) == len(entries)
    # Resuming after any entry (also between the two items of e-2) gives exactly the rest.
    for index, entry in enumerate(entries):
        rest, rest_resume = await suite.list_all(since=entry.cursor, page_size=3)
        assert rest == entries[index + 1 :], index
        assert rest_resume == resume
    # Caught up: an empty page, the same resume cursor, and no next page.
    page = await suite.stub.ListInteractions(
        pb.ListInteractionsRequest(since_cursor=resume), metadata=suite.recommender
    )
    assert list(page.entries) == [] and page.next_page_token == "" and page.resume_cursor == resume
    # What commits later continues from there.
    await suite.ingest(purchase("e-12", items=("h",)), view("e-13", customer="c-2"))
    later, _ = await suite.list_all(since=resume)
    assert summary(later) == [("e-12", "c-1", "h", "INTERACTION_TYPE_PURCHASE", 4.0)]


async def test_a_cursor_survives_a_restart(consented_profile, start_service, dev_tokens, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.ingest(view("e-1"), purchase("e-2", items=("b", "c")))
    entries, _ = await suite.list_all()
    await suite.profile.running.stop(0)
    again = await start_service(
        "profile",
        database_url,
        consent_address=f"127.0.0.1:{suite.consent.running.port}",
        service_token=dev_tokens["service:profile"],
    )
    cache = again.running.app.registrations[0].servicer.consent
    assert await cache.wait_synced(10)
    stub = pb_grpc.ProfileServiceStub(again.channel)
    page = await stub.ListInteractions(
        pb.ListInteractionsRequest(since_cursor=entries[1].cursor), metadata=again.auth(RECOMMENDER)
    )
    assert summary(page.entries) == summary(entries[2:])


async def test_withdrawn_data_stops_appearing_even_for_earlier_interactions(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.grant("c-2")
    await suite.ingest(view("e-1"), purchase("e-2"), view("e-3", customer="c-2"))
    entries, _ = await suite.list_all()
    assert [e.interaction.event_id for e in entries] == ["e-1", "e-2", "e-3"]

    await suite.withdraw("c-1", categories=[BROWSING])  # purchases stay granted
    entries, _ = await suite.list_all()
    assert [e.interaction.event_id for e in entries] == ["e-2", "e-3"]
    await suite.withdraw("c-1")  # the whole purpose
    entries, resume = await suite.list_all()
    assert [e.interaction.event_id for e in entries] == ["e-3"]
    # A consent for another purpose does not open the feed.
    await suite.grant("c-1", purpose="analytics")
    assert [e.interaction.event_id for e in (await suite.list_all())[0]] == ["e-3"]
    # Granted again: a full resync (empty cursor) serves it again; a reader already past it
    # does not get it twice.
    await suite.grant("c-1")
    entries, again = await suite.list_all()
    assert [e.interaction.event_id for e in entries] == ["e-1", "e-2", "e-3"]
    assert (await suite.list_all(since=resume))[0] == [] and again == resume


async def test_watch_replays_then_streams_live_and_resumes(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.ingest(view("e-1"), purchase("e-2", items=("b", "c")), view("e-3", customer="c-2"))
    stream = suite.stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=suite.recommender)
    replayed, caught_up = await read_until_heartbeat(stream)
    assert [(e.interaction.event_id, e.interaction.item_id) for e in replayed] == [
        ("e-1", "a"),
        ("e-2", "b"),
        ("e-2", "c"),
    ]
    listed, listed_resume = await suite.list_all()
    assert replayed == listed and caught_up == listed_resume

    # Live: a commit wakes the watcher (the ingestor notifies the feed).
    await suite.ingest(purchase("e-4", items=("d",)))
    live, after_live = await read_entries(stream)
    assert summary(live) == [("e-4", "c-1", "d", "INTERACTION_TYPE_PURCHASE", 4.0)]
    stream.cancel()

    # Reconnecting from the last resume cursor gives exactly what was missed.
    await suite.ingest(view("e-5", item="x"), view("e-6", customer="c-2"))
    resumed = suite.stub.WatchInteractions(
        pb.WatchInteractionsRequest(since_cursor=after_live), metadata=suite.recommender
    )
    missed, _ = await read_until_heartbeat(resumed)
    assert summary(missed) == [("e-5", "c-1", "x", "INTERACTION_TYPE_VIEW", 1.0)]
    resumed.cancel()


async def test_watch_sees_events_committed_by_another_replica(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    stream = suite.stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=suite.recommender)
    assert await read_until_heartbeat(stream) == ([], suite.cursor_text(Cursor()))
    # No notify here: the feed's poll of the event head finds it.
    stored = purchase("elsewhere-1", items=("z",))
    await asyncio.to_thread(insert_event_directly, suite.database_url, stored, "c-1", PURCHASES)
    live, _ = await read_entries(stream)
    assert summary(live) == [("elsewhere-1", "c-1", "z", "INTERACTION_TYPE_PURCHASE", 4.0)]
    stream.cancel()


async def test_a_merge_appears_as_a_notice_in_commit_order(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.grant("c-2")
    await suite.grant("c-3", categories=(BROWSING,), purpose="analytics")
    statuses = await suite.ingest(view("e-1", customer="c-2"), view("e-2", customer="c-3"))
    assert statuses == [pb.EVENT_RESULT_STATUS_ACCEPTED] * 2
    stream = suite.stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=suite.recommender)
    replayed, _ = await read_until_heartbeat(stream)
    assert [e.interaction.event_id for e in replayed] == ["e-1"]  # c-3 keeps it from recommendations

    # c-3 turns out to be c-1: from the merge on, c-1's consent governs c-3's events, and the
    # feed tells the consumer to re-key c-3 as c-1.
    merged = await suite.stub.MergeCustomers(
        pb.MergeCustomersRequest(request_id="m-1", source_customer_id="c-3", target_customer_id="c-1"),
        metadata=suite.profile.auth("service:crm"),
    )
    live, _ = await read_entries(stream)  # the merge wakes the watcher (it pokes the feed)
    assert summary(live) == [("merge", "c-3", "c-1")]
    assert live[0].customer_merge.merge_time == merged.merge_time
    await suite.ingest(view("e-3", customer="c-3", item="k"))  # the old id reaches c-1
    live, _ = await read_entries(stream)
    assert summary(live) == [("e-3", "c-1", "k", "INTERACTION_TYPE_VIEW", 1.0)]
    stream.cancel()

    # A full replay has c-3's event (recorded for c-3, now consented through c-1) before the
    # merge, in commit order; resuming after the notice gives what came after it.
    everything, _ = await suite.list_all(page_size=1)
    assert summary(everything) == [
        ("e-1", "c-2", "a", "INTERACTION_TYPE_VIEW", 1.0),
        ("e-2", "c-3", "a", "INTERACTION_TYPE_VIEW", 1.0),
        ("merge", "c-3", "c-1"),
        ("e-3", "c-1", "k", "INTERACTION_TYPE_VIEW", 1.0),
    ]
    after_merge, _ = await suite.list_all(since=everything[2].cursor)
    assert summary(after_merge) == summary(everything[3:])
    # c-1 withdraws: the merged-in events go with its own; the notice stays (it holds no data).
    await suite.withdraw("c-1")
    assert summary((await suite.list_all())[0]) == [
        ("e-1", "c-2", "a", "INTERACTION_TYPE_VIEW", 1.0),
        ("merge", "c-3", "c-1"),
    ]


async def test_draining_ends_watches_with_unavailable(consented_profile):
    suite = await start_suite(consented_profile)
    await suite.grant("c-1")
    stream = suite.stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=suite.recommender)
    await read_until_heartbeat(stream)
    started = time.monotonic()
    stopping = asyncio.create_task(suite.profile.running.stop(20))
    error = await rpc_error(asyncio.wait_for(stream.read(), WAIT))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "SERVER_SHUTTING_DOWN"
    await stopping
    # The watch did not hold the graceful stop to its 20 s limit.
    assert time.monotonic() - started < 10


def _cursor_text(raw: object) -> str:
    return "i1." + base64.urlsafe_b64encode(json.dumps(raw).encode()).decode()


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage",
        "i1.",
        "i1.!!!",
        _cursor_text({"seq": 1}),
        _cursor_text([1]),
        _cursor_text([1, 0, 0, ""]),  # another shape
        _cursor_text([-1, 0]),
        _cursor_text([1, 501]),
        _cursor_text([1.5, 0]),
        _cursor_text([True, 0]),
        _cursor_text([2**63, 0]),
        _cursor_text([1, "0"]),
        "i1." + "A" * 600,
        "i1." + base64.urlsafe_b64encode(b"\xff\xfe").decode(),
    ],
)
async def test_a_bad_cursor_is_invalid_argument_naming_its_field(start_service, cursor):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    recommender = profile.auth(RECOMMENDER)
    for request, field in (
        (pb.ListInteractionsRequest(since_cursor=cursor), "since_cursor"),
        (pb.ListInteractionsRequest(page_token=cursor), "page_token"),
    ):
        error = await rpc_error(stub.ListInteractions(request, metadata=recommender))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert set(field_violations(error)) == {field} and error_reason(error) == "INVALID_PAGE_TOKEN"
    error = await rpc_error(
        stub.WatchInteractions(pb.WatchInteractionsRequest(since_cursor=cursor), metadata=recommender).read()
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and set(field_violations(error)) == {
        "since_cursor"
    }


async def test_bad_paging_names_every_field(start_service):
    profile = await start_service("profile")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    for size in (-1, 1001):
        error = await rpc_error(
            stub.ListInteractions(
                pb.ListInteractionsRequest(page_size=size, since_cursor="nope"), metadata=profile.auth()
            )
        )
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == {"page_size", "since_cursor"}


async def test_a_cursor_beyond_the_feed_is_expired(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url, customers_=("c-1",))
    await suite.grant("c-1")
    await suite.ingest(view("e-1"))
    beyond = suite.cursor_text(Cursor(seq=1_000_000))
    error = await rpc_error(
        suite.stub.ListInteractions(
            pb.ListInteractionsRequest(since_cursor=beyond), metadata=suite.recommender
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "CURSOR_EXPIRED"
    stream = suite.stub.WatchInteractions(
        pb.WatchInteractionsRequest(since_cursor=beyond), metadata=suite.recommender
    )
    error = await rpc_error(stream.read())
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "CURSOR_EXPIRED"


async def test_stale_consent_state_fails_closed(start_service):
    # No consent service is running: the cache never hears from it.
    profile = await start_service("profile", consent_address="127.0.0.1:9")
    stub = pb_grpc.ProfileServiceStub(profile.channel)
    recommender = profile.auth(RECOMMENDER)
    error = await rpc_error(stub.ListInteractions(pb.ListInteractionsRequest(), metadata=recommender))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "CONSENT_STATE_STALE"
    error = await rpc_error(
        stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=recommender).read()
    )
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "CONSENT_STATE_STALE"


@pytest.mark.parametrize(
    "principal", ["service:storefront", "service:store", "service:crm", "service:consent"]
)
async def test_only_the_recommender_and_admin_read_the_feed(consented_profile, principal):
    suite = await start_suite(consented_profile, customers_=())
    for allowed in (RECOMMENDER, "admin"):
        page = await suite.stub.ListInteractions(
            pb.ListInteractionsRequest(), metadata=suite.profile.auth(allowed)
        )
        assert page.resume_cursor
    metadata = suite.profile.auth(principal)
    for call in (
        suite.stub.ListInteractions(pb.ListInteractionsRequest(), metadata=metadata),
        suite.stub.WatchInteractions(pb.WatchInteractionsRequest(), metadata=metadata).read(),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"
