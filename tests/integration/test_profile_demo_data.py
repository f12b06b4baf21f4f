"""The demo data loads through the real services, is idempotent, and the profile service
finds in it what the generator put there."""

from __future__ import annotations

import asyncio
import json

from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as rec_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as rec_grpc

from services.demo_data import load_demo

CUSTOMERS = 30


async def start_suite(start_service, dev_tokens, database_url):
    """The four services in this process; the profile service on `database_url` and
    following the consent service."""
    consent = await start_service("consent")
    profile = await start_service(
        "profile",
        database_url,
        consent_address=f"127.0.0.1:{consent.running.port}",
        service_token=dev_tokens["service:profile"],
    )
    recommendation = await start_service("recommendation")
    replenishment = await start_service("replenishment")
    addresses = {
        f"NAJIMI_{name.upper()}_ADDRESS": f"127.0.0.1:{service.running.port}"
        for name, service in (
            ("consent", consent),
            ("profile", profile),
            ("recommendation", recommendation),
            ("replenishment", replenishment),
        )
    }
    return addresses, profile, recommendation


async def test_demo_data_loads_once_and_again_adds_nothing(start_service, dev_tokens, database_url, tmp_path):
    addresses, profile, recommendation = await start_suite(start_service, dev_tokens, database_url)
    first = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, CUSTOMERS)
    data = first.data
    assert len(data.customers) == CUSTOMERS and first.existing_customers == 0
    collectable = {c.customer_id: c.collectable_categories for c in data.customers}
    consented = sum(1 for e in data.events if e.data_category in collectable[e.customer_id])
    assert not first.events.unimplemented and first.events.problems == []
    # Every consented event is accepted, every other one rejected for consent, none invalid.
    assert first.events.statuses == {
        "ACCEPTED": consented,
        "REJECTED_CONSENT": len(data.events) - consented,
    }
    assert 0 < len(data.events) - consented < consented

    # The next start finds the load complete (demo-data.json) and the data still there.
    again = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, CUSTOMERS)
    assert again.already_loaded and again.events.statuses.total() == 0
    assert again.device_id == first.device_id

    forced = await asyncio.to_thread(
        load_demo, addresses, dev_tokens["admin"], tmp_path, CUSTOMERS, None, True
    )
    assert forced.data == data  # the same end time, kept in demo-data.json: the same data
    assert not forced.already_loaded and forced.events.statuses == {
        "DUPLICATE": consented,
        "REJECTED_CONSENT": len(data.events) - consented,
    }
    assert forced.device_id == first.device_id and forced.grants == first.grants
    assert json.loads((tmp_path / "demo-data.json").read_text())["end_us"] == data.end_us
    assert (tmp_path / "demo-devices.json").exists()

    profiles = pb_grpc.ProfileServiceStub(profile.channel)
    aiko = await profiles.GetCustomer(pb.GetCustomerRequest(customer_id="demo-aiko"), metadata=profile.auth())
    assert aiko.customer.email == "aiko@example.com" and aiko.customer.region == "JP-13"
    card = data.customers[5].loyalty_card
    resolved = await profiles.ResolveIdentity(
        pb.ResolveIdentityRequest(
            identifier=pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value=card, issuer="najimi-club")
        ),
        metadata=profile.auth("service:store"),
    )
    assert resolved.customer_id == data.customers[5].customer_id

    catalog = rec_grpc.RecommendationServiceStub(recommendation.channel)
    ink = await catalog.GetItem(rec_pb.GetItemRequest(item_id="ink-black-xl"), metadata=recommendation.auth())
    assert list(ink.item.category_path) == ["office", "printing", "ink"]


async def test_traits_find_the_cadence_the_generator_put_in(
    start_service, dev_tokens, database_url, tmp_path
):
    """Aiko's printer re-orders black ink about every 30 days and colour ink about every 45:
    the profile service's purchase-cadence traits see exactly that."""
    addresses, profile, _ = await start_suite(start_service, dev_tokens, database_url)
    report = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, 3)
    assert report.events.statuses["ACCEPTED"] > 0
    # The traits follow the events in the background: wait until they include them all.
    assert await profile.running.app.registrations[0].servicer.trait_worker.wait_until_processed(timeout=30)
    profiles = pb_grpc.ProfileServiceStub(profile.channel)
    traits = (
        await profiles.GetTraits(
            pb.GetTraitsRequest(customer_id="demo-aiko", max_items=100), metadata=profile.auth("service:crm")
        )
    ).traits
    cadences = {c.item_id: c.mean_interval.seconds / 86_400 for c in traits.item_cadences}
    assert 27 <= cadences["ink-black-xl"] <= 33
    assert 40 <= cadences["ink-colour"] <= 50
    # Ben buys coffee beans about every 14 days.
    ben = (
        await profiles.GetTraits(
            pb.GetTraitsRequest(customer_id="demo-ben"), metadata=profile.auth("service:crm")
        )
    ).traits
    beans = {c.item_id: c.mean_interval.seconds / 86_400 for c in ben.item_cadences}["coffee-beans"]
    assert 12 <= beans <= 16


async def test_a_load_after_an_erasure_and_a_merge_skips_the_erased_and_resends_nothing(
    start_service, dev_tokens, database_url, tmp_path
):
    """After the README's MergeCustomers example and a data-subject erasure, the demo still
    loads: the erased customer is skipped (CreateCustomer: CUSTOMER_ERASED), the merged-away
    customer's events are refused once and counted, never sent again."""
    addresses, profile, _ = await start_suite(start_service, dev_tokens, database_url)
    first = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, 3)
    assert first.device_id and first.customers.erased == []
    await privacy_grpc.DataSubjectServiceStub(profile.channel).EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="demo-aiko", request_id="dsr-aiko"),
        metadata=profile.auth("service:consent"),
    )
    await pb_grpc.ProfileServiceStub(profile.channel).MergeCustomers(
        pb.MergeCustomersRequest(
            request_id="merge-1", source_customer_id="demo-ben", target_customer_id="demo-chloe"
        ),
        metadata=profile.auth("service:storefront"),
    )

    again = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, 3, None, True)
    assert again.customers.erased == ["demo-aiko"] and again.customers.ready == 2
    assert again.device_id == ""  # the demo device is Aiko's
    assert any("erased" in line and "demo-aiko" in line for line in again.lines())
    sent = [e for e in again.data.events if e.customer_id != "demo-aiko"]
    assert again.events.statuses.total() == len(sent)  # each event sent once
    # Ben's events now resolve to Chloe, who consents to nothing: refused, not retried.
    bens = sum(1 for e in sent if e.customer_id == "demo-ben")
    assert again.events.statuses["REJECTED_CONSENT"] >= bens > 0
    assert again.events.refused_despite_grant > 0
    assert again.events.seconds < 10  # the old loader retried these for 20 s
