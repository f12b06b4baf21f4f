"""The recommender's local consented interaction copy, fed by profile's interaction feed through
real gRPC, with a real consent service, on SQLite and PostgreSQL: events ingested into
profile appear in the copy, a merge re-keys, a withdrawal drops, an erasure removes, and a
restart resumes from the remembered cursor without duplicates."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import sqlalchemy as sa
from google.protobuf import json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb

from services.recommendation.interactions import (
    InteractionCopy,
    StoredInteraction,
    all_interactions,
    drop_unconsented,
)
from shared.consent_cache import ConsentCache
from shared.db import now_micros
from tests.conftest import InProcessService
from tests.integration.test_profile_interactions import (
    BROWSING,
    PURCHASES,
    Suite,
    purchase,
    start_suite,
    view,
)

WAIT = 10.0  # seconds the copy may take to follow (polled, never slept blindly)


def recommendation_url(database_url: str) -> str:
    # SQLite: a file per service; PostgreSQL: a schema per service in the same database.
    return (
        database_url.replace("test.db", "recommendation.db")
        if database_url.startswith("sqlite")
        else database_url
    )


async def start_recommendation(
    start_service, dev_tokens, suite: Suite, database_url: str
) -> InProcessService:
    service = await start_service(
        "recommendation",
        recommendation_url(database_url),
        consent_address=f"127.0.0.1:{suite.consent.running.port}",
        profile_address=f"127.0.0.1:{suite.profile.running.port}",
        service_token=dev_tokens["service:recommendation"],
    )
    assert await copy_of(service).consent.wait_synced(WAIT), "recommendation's consent cache did not sync"
    return service


def copy_of(service: InProcessService) -> InteractionCopy:
    return service.running.app.registrations[1].servicer.copy


async def held(service: InProcessService) -> list[StoredInteraction]:
    return await copy_of(service).db.read(all_interactions)


def rows(entries: list[StoredInteraction]) -> list[tuple[str, str, str]]:
    return sorted((e.customer_id, e.event_id, e.item_id) for e in entries)


async def until(service: InProcessService, condition: Callable[[list[StoredInteraction]], bool]) -> list:
    """The copy once `condition` holds of it; fails after WAIT seconds."""
    deadline = time.monotonic() + WAIT
    while True:
        entries = await held(service)
        if condition(entries):
            return entries
        assert time.monotonic() < deadline, f"the copy never got there; it holds {rows(entries)}"
        await asyncio.sleep(0.05)


async def two_customers_copied(
    consented_profile, start_service, dev_tokens, database_url
) -> tuple[Suite, InProcessService]:
    """c-1 (a view and a purchase) and c-2 (a view), consented and in the copy."""
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.grant("c-2")
    await suite.ingest(view("e-1"), purchase("e-2"), view("e-3", customer="c-2"))
    recommendation = await start_recommendation(start_service, dev_tokens, suite, database_url)
    await until(recommendation, lambda e: len(e) == 3)
    return suite, recommendation


async def test_ingested_events_appear_and_a_merge_rekeys(
    consented_profile, start_service, dev_tokens, database_url
):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.grant("c-3")
    await suite.ingest(view("e-1"), purchase("e-2", customer="c-3", items=("b", "c")))
    recommendation = await start_recommendation(start_service, dev_tokens, suite, database_url)
    # The backlog arrives through ListInteractions ...
    entries = await until(recommendation, lambda e: len(e) == 3)
    assert rows(entries) == [("c-1", "e-1", "a"), ("c-3", "e-2", "b"), ("c-3", "e-2", "c")]
    stored = next(e for e in entries if e.event_id == "e-1")
    assert stored.interaction_type == pb.INTERACTION_TYPE_VIEW and stored.data_category == BROWSING
    # ... and what is ingested later through WatchInteractions; c-2 never consented.
    await suite.ingest(view("e-3", item="k"), view("e-4", customer="c-2"))
    await until(recommendation, lambda e: ("c-1", "e-3", "k") in rows(e))

    # c-3 turns out to be c-1: the copy re-keys c-3's entries as c-1's.
    await suite.stub.MergeCustomers(
        pb.MergeCustomersRequest(request_id="m-1", source_customer_id="c-3", target_customer_id="c-1"),
        metadata=suite.profile.auth("service:crm"),
    )
    entries = await until(recommendation, lambda e: all(x.customer_id == "c-1" for x in e))
    assert rows(entries) == [
        ("c-1", "e-1", "a"),
        ("c-1", "e-2", "b"),
        ("c-1", "e-2", "c"),
        ("c-1", "e-3", "k"),
    ]
    assert all(e.event_id != "e-4" for e in entries)


async def test_a_withdrawal_drops_the_withdrawn_categories(
    consented_profile, start_service, dev_tokens, database_url
):
    suite, recommendation = await two_customers_copied(
        consented_profile, start_service, dev_tokens, database_url
    )
    # c-1 withdraws browsing history only: their views go, their purchase and c-2's view stay.
    await suite.withdraw("c-1", categories=(BROWSING,))
    entries = await until(recommendation, lambda e: len(e) == 2)
    assert rows(entries) == [("c-1", "e-2", "b"), ("c-2", "e-3", "a")]
    assert {e.data_category for e in entries if e.customer_id == "c-1"} == {PURCHASES}
    # c-2 withdraws the purpose altogether.
    await suite.withdraw("c-2")
    entries = await until(recommendation, lambda e: len(e) == 1)
    assert rows(entries) == [("c-1", "e-2", "b")]


async def test_an_erasure_removes_the_customer_and_export_lists_them(
    consented_profile, start_service, dev_tokens, database_url
):
    _, recommendation = await two_customers_copied(consented_profile, start_service, dev_tokens, database_url)
    data_subject = privacy_grpc.DataSubjectServiceStub(recommendation.channel)
    exported = await data_subject.ExportCustomerData(
        privacy_pb.ExportCustomerDataRequest(customer_id="c-1", request_id="x-1"),
        metadata=recommendation.auth("service:consent"),
    )
    document = json_format.MessageToDict(exported.document)
    assert sorted((i["event_id"], i["item_id"]) for i in document["held"]["interactions"]) == [
        ("e-1", "a"),
        ("e-2", "b"),
    ]
    assert {i["interaction_type"] for i in document["held"]["interactions"]} == {
        "INTERACTION_TYPE_VIEW",
        "INTERACTION_TYPE_PURCHASE",
    }
    erased = await data_subject.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="c-1", request_id="d-1"),
        metadata=recommendation.auth("service:consent"),
    )
    assert dict(erased.erased_records) == {"interactions": 2}
    assert rows(await held(recommendation)) == [("c-2", "e-3", "a")]  # at once, no waiting


async def test_a_restart_resumes_from_the_cursor_without_duplicates(
    consented_profile, start_service, dev_tokens, database_url
):
    suite = await start_suite(consented_profile, database_url)
    await suite.grant("c-1")
    await suite.ingest(view("e-1"), purchase("e-2", items=("b", "c")))
    recommendation = await start_recommendation(start_service, dev_tokens, suite, database_url)
    await until(recommendation, lambda e: len(e) == 3)
    cursor = await copy_of(recommendation).cursor()
    assert cursor, "the cursor is remembered in the database"
    await recommendation.running.stop(0)

    # Events arrive while the recommender is down; after the restart it resumes from the
    # stored cursor: the new ones once, the old ones not again.
    await suite.ingest(view("e-3", item="k"), purchase("e-4", items=("m",)))
    again = await start_recommendation(start_service, dev_tokens, suite, database_url)
    entries = await until(again, lambda e: len(e) >= 5)
    await suite.ingest(view("e-5", item="n"))  # and it watches on
    entries = await until(again, lambda e: any(x.event_id == "e-5" for x in e))
    counts = Counter((e.event_id, e.item_id) for e in entries)
    assert counts == Counter(
        {("e-1", "a"): 1, ("e-2", "b"): 1, ("e-2", "c"): 1, ("e-3", "k"): 1, ("e-4", "m"): 1, ("e-5", "n"): 1}
    )


async def test_the_copy_lives_in_the_migrated_tables(
    consented_profile, start_service, dev_tokens, database_url
):
    suite = await start_suite(consented_profile, database_url)
    recommendation = await start_recommendation(start_service, dev_tokens, suite, database_url)
    inspector = await copy_of(recommendation).db.read(lambda c: sa.inspect(c).get_table_names())
    assert {"interactions", "feed_cursors"} <= set(inspector)


async def test_the_sweep_leaves_entries_newer_than_the_caches_confirmation(
    consented_profile, start_service, dev_tokens, database_url
):
    """Profile may serve an entry under a grant this service's cache has not applied yet: the
    sweep judges only entries stored before the cache last confirmed it was caught up."""
    _, recommendation = await two_customers_copied(consented_profile, start_service, dev_tokens, database_url)
    # A cache that has applied nothing refuses everyone, as a lagging one refuses a new grant.
    lagging = ConsentCache("127.0.0.1:9", "")
    db = copy_of(recommendation).db
    newest = max(e.occur_time_us for e in await held(recommendation))  # long before storing
    assert await db.write(lambda c: drop_unconsented(c, lagging, stored_before_us=newest)) == 0
    assert len(await held(recommendation)) == 3
    assert await db.write(lambda c: drop_unconsented(c, lagging, stored_before_us=now_micros())) == 3
    assert await held(recommendation) == []
