"""A database restored to an earlier state while the services run (shared/feed_watch.py).

The feeds' heads go back. Consent must reload its index, so that checks answer from the
restored state and the changes committed after the restore (which reuse the undone
revisions) are not skipped; a watch stream that had sent an undone revision must end with
OUT_OF_RANGE (REVISION_AHEAD; CURSOR_EXPIRED on profile's interaction feed), so its caller
rebuilds instead of silently missing events.

The restore is logical, the same on SQLite and PostgreSQL: every table's rows are copied
at one point and put back later in one transaction.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import sqlalchemy as sa
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as rp_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as rp_grpc

from shared.db import create_engine
from tests.conftest import error_reason
from tests.integration.test_consent_decisions import PURCHASES, RECS, grant, withdraw
from tests.integration.test_profile_interactions import read_until_heartbeat, start_suite, view
from tests.integration.test_replenishment_devices import _registration

WAIT_SECONDS = 10.0  # polls notice a restore within a second; this is only the deadline
# The interaction feed's watcher would also end at its next heartbeat (10 s) without noticing
# the restore: a deadline well inside that tells the two apart.
INTERACTION_WAIT_SECONDS = 5.0


class Snapshot:
    """Every table's rows of a service's schema at one point, to be put back (a restore)."""

    def __init__(self, database_url: str, schema: str):
        self.engine = create_engine(database_url, schema)
        self.metadata = sa.MetaData()
        self.metadata.reflect(self.engine)
        with self.engine.connect() as connection:
            self.rows = {
                table.name: [dict(row._mapping) for row in connection.execute(sa.select(table))]
                for table in self.metadata.sorted_tables
            }

    def restore(self) -> None:
        with self.engine.begin() as connection:
            for table in reversed(self.metadata.sorted_tables):
                connection.execute(table.delete())
            for table in self.metadata.sorted_tables:
                if self.rows[table.name]:
                    connection.execute(table.insert(), self.rows[table.name])
        self.engine.dispose()


async def _ended_with(stream: Any, seconds: float = WAIT_SECONDS) -> grpc.aio.AioRpcError:
    """The error a watch stream ends with, reading (and dropping) what it sends until then."""

    async def drain() -> grpc.aio.AioRpcError:
        try:
            while await stream.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return error
        raise AssertionError("the watch ended without an error")

    return await asyncio.wait_for(drain(), seconds)


async def test_consent_follows_a_restored_database(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    admin = consent.auth()
    kept = await stub.GrantConsent(grant(customer="c-1", request_id="g-1"), metadata=admin)
    snapshot = Snapshot(database_url, "consent")
    await stub.GrantConsent(grant(customer="c-2", request_id="g-2"), metadata=admin)
    undone = await stub.GrantConsent(grant(customer="c-3", request_id="g-3"), metadata=admin)
    watch = stub.WatchConsentChanges(
        pb.WatchConsentChangesRequest(since_revision=undone.consent.revision), metadata=admin
    )
    assert (await watch.read()).HasField("heartbeat")  # caught up at the undone revision

    await asyncio.to_thread(snapshot.restore)
    ended = await _ended_with(watch)
    assert ended.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(ended) == "REVISION_AHEAD"

    # The restored state answers, and a change after the restore (reusing an undone
    # revision) is seen at once, not skipped as already applied.
    withdrawn = await stub.WithdrawConsent(withdraw(customer="c-1", request_id="w-1"), metadata=admin)
    assert withdrawn.consent.revision == kept.consent.revision + 1 <= undone.consent.revision

    def check(customer: str) -> pb.CheckConsentRequest:
        return pb.CheckConsentRequest(customer_id=customer, purpose=RECS, data_categories=[PURCHASES])

    refused = await stub.CheckConsent(check("c-1"), metadata=admin)
    assert not refused.allowed and refused.reason == pb.CONSENT_CHECK_REASON_WITHDRAWN
    for customer in ("c-2", "c-3"):
        forgotten = await stub.CheckConsent(check(customer), metadata=admin)
        assert not forgotten.allowed and forgotten.reason == pb.CONSENT_CHECK_REASON_NOT_GIVEN
    listed = await stub.ListConsentChanges(pb.ListConsentChangesRequest(since_revision=0), metadata=admin)
    assert [(c.customer_id, c.revision) for c in listed.changes] == [
        ("c-1", kept.consent.revision),
        ("c-1", withdrawn.consent.revision),
    ]
    # A watch from the restored head sees the next change.
    again = stub.WatchConsentChanges(
        pb.WatchConsentChangesRequest(since_revision=withdrawn.consent.revision), metadata=admin
    )
    assert (await again.read()).HasField("heartbeat")
    regranted = await stub.GrantConsent(grant(customer="c-2", request_id="g-4"), metadata=admin)
    change = await asyncio.wait_for(again.read(), WAIT_SECONDS)
    assert change.change.customer_id == "c-2" and change.change.revision == regranted.consent.revision
    again.cancel()


async def test_a_slot_event_watch_beyond_a_restored_database_ends(start_service, database_url):
    service = await start_service("replenishment", database_url)
    stub = rp_grpc.ReplenishmentServiceStub(service.channel)
    admin = service.auth()
    storefront = service.auth("service:storefront")
    await stub.RegisterDevice(_registration("reg-1", "SN-1"), metadata=storefront)
    snapshot = Snapshot(database_url, "replenishment")
    await stub.RegisterDevice(_registration("reg-2", "SN-2"), metadata=storefront)
    listed = await stub.ListSlotEvents(rp_pb.ListSlotEventsRequest(customer_id="cus_42"), metadata=admin)
    head = listed.current_revision
    watch = stub.WatchSlotEvents(
        rp_pb.WatchSlotEventsRequest(customer_id="cus_42", since_revision=head), metadata=admin
    )
    assert (await watch.read()).HasField("heartbeat")

    await asyncio.to_thread(snapshot.restore)
    ended = await _ended_with(watch)
    assert ended.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(ended) == "REVISION_AHEAD"

    third = await stub.RegisterDevice(_registration("reg-3", "SN-3"), metadata=storefront)
    replay = await stub.ListSlotEvents(rp_pb.ListSlotEventsRequest(customer_id="cus_42"), metadata=admin)
    devices = [event.device_id for event in replay.events]
    assert third.device.device_id in devices and len(set(devices)) == 2  # the undone device is gone


async def test_an_interaction_watch_beyond_a_restored_database_ends(consented_profile, database_url):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.ingest(view("e-1"))
    snapshot = Snapshot(suite.database_url, "profile")
    await suite.ingest(view("e-2"))
    watch = suite.stub.WatchInteractions(profile_pb.WatchInteractionsRequest(), metadata=suite.recommender)
    replayed, _ = await read_until_heartbeat(watch)
    assert [entry.interaction.event_id for entry in replayed] == ["e-1", "e-2"]

    await asyncio.to_thread(snapshot.restore)
    ended = await _ended_with(watch, INTERACTION_WAIT_SECONDS)
    assert ended.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(ended) == "CURSOR_EXPIRED"
    again = suite.stub.WatchInteractions(profile_pb.WatchInteractionsRequest(), metadata=suite.recommender)
    replayed, _ = await read_until_heartbeat(again)
    assert [entry.interaction.event_id for entry in replayed] == ["e-1"]
    again.cancel()


async def test_the_serving_catalog_follows_a_restored_database(start_service, database_url):
    service = await start_service("recommendation", database_url)
    stub = rec_grpc.RecommendationServiceStub(service.channel)
    catalog = service.auth("service:catalog")

    def coffee(item_id: str) -> rec_pb.Item:
        return rec_pb.Item(
            item_id=item_id, title=item_id, category_path=["grocery", "coffee"], available=True
        )

    async def similar_to_beans() -> list[str]:
        found = await stub.SimilarItems(
            rec_pb.SimilarItemsRequest(item_id="beans"), metadata=service.auth("service:storefront")
        )
        return [item.item_id for item in found.items]

    await stub.UpsertItems(
        rec_pb.UpsertItemsRequest(request_id="u-1", items=[coffee("beans"), coffee("filter")]),
        metadata=catalog,
    )
    snapshot = Snapshot(database_url, "recommendation")
    await stub.UpsertItems(
        rec_pb.UpsertItemsRequest(request_id="u-2", items=[coffee("grinder")]), metadata=catalog
    )
    assert sorted(await similar_to_beans()) == ["filter", "grinder"]  # served from the catalog held

    await asyncio.to_thread(snapshot.restore)
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while (found := await similar_to_beans()) != ["filter"]:  # the undone item leaves serving
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.02)
