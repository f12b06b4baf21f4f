"""The demo data loads through the real services, is idempotent, and the profile service
finds in it what the generator put there."""

from __future__ import annotations

import asyncio
import json

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

    second = await asyncio.to_thread(load_demo, addresses, dev_tokens["admin"], tmp_path, CUSTOMERS)
    assert second.data == data  # the same end time, kept in demo-data.json: the same data
    assert second.events.statuses == {
        "DUPLICATE": consented,
        "REJECTED_CONSENT": len(data.events) - consented,
    }
    assert second.device_id == first.device_id and second.grants == first.grants
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
