"""Loads a generated dataset (synthetic.py) into a running suite through its RPCs, as the
other systems would: the catalog by UpsertItems (service:catalog), each customer by
profile's CreateCustomer with their attributes and consent's GrantConsent for
personalize.recommendations (service:storefront), and the interactions as events by
IngestEvents. For the end-to-end training test and the quality bench.

Event times are moved to end an hour ago (profile refuses events older than its retention),
keeping their order and spacing. Events are sent until profile accepts them: its consent
cache follows the grants a moment later.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.servicer import item_message
from services.recommendation.training.dataset import ATTRIBUTE_CATEGORIES, TrainingData
from services.recommendation.training.features import CustomerAttributes

PURPOSE = "personalize.recommendations"
# What each customer grants for PURPOSE: the interactions' categories and the attributes'.
GRANTED_CATEGORIES = (
    "user.behavior.browsing_history",
    "user.behavior.purchase_history",
    *ATTRIBUTE_CATEGORIES.values(),
)
EVENT_OF_INTERACTION = {
    profile_pb.INTERACTION_TYPE_VIEW: profile_pb.EVENT_TYPE_PRODUCT_VIEW,
    profile_pb.INTERACTION_TYPE_ADD_TO_CART: profile_pb.EVENT_TYPE_ADD_TO_CART,
    profile_pb.INTERACTION_TYPE_PURCHASE: profile_pb.EVENT_TYPE_PURCHASE,
}
# An age in each band (profile derives age_range from birth_year).
AGE_OF_RANGE = {"under-18": 16, "18-24": 21, "25-34": 30, "35-44": 40, "45-54": 50, "55-64": 60, "65+": 70}
BATCH = 1000  # items per UpsertItems, events per IngestEvents: the contracts' limits
ACCEPTED = {profile_pb.EVENT_RESULT_STATUS_ACCEPTED, profile_pb.EVENT_RESULT_STATUS_DUPLICATE}


@dataclass(frozen=True)
class Addresses:
    consent: str
    profile: str
    recommendation: str


Metadata = tuple[tuple[str, str], ...]


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def in_parallel(calls: Sequence[Callable[[], Awaitable[object]]], concurrency: int) -> None:
    """Runs the calls, at most `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(call: Callable[[], Awaitable[object]]) -> None:
        async with gate:
            await call()

    await asyncio.gather(*(one(call) for call in calls))


def customer_request(customer: CustomerAttributes) -> profile_pb.CreateCustomerRequest:
    this_year = datetime.datetime.now(datetime.UTC).year
    gender = (
        profile_pb.Gender.Value(f"GENDER_{customer.gender.upper()}")
        if customer.gender
        else profile_pb.GENDER_UNSPECIFIED
    )
    attributes = profile_pb.Customer(gender=gender, region=customer.region)
    if customer.age_range:
        attributes.birth_year = this_year - AGE_OF_RANGE[customer.age_range]
    return profile_pb.CreateCustomerRequest(
        request_id=f"create-{customer.customer_id}", customer_id=customer.customer_id, customer=attributes
    )


def grant_request(customer_id: str) -> consent_pb.GrantConsentRequest:
    return consent_pb.GrantConsentRequest(
        customer_id=customer_id,
        purpose=PURPOSE,
        data_categories=list(GRANTED_CATEGORIES),
        notice_version=1,
        collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
        jurisdiction="JP",
        request_id=f"grant-{customer_id}",
    )


def events_of(data: TrainingData) -> list[profile_pb.Event]:
    """One event per interaction, its times moved to end an hour ago."""
    newest = max(interaction.occur_time_us for interaction in data.interactions)
    shift = int((time.time() - 3600) * 1_000_000) - newest
    events = []
    for interaction in data.interactions:
        at = Timestamp()
        at.FromMicroseconds(interaction.occur_time_us + shift)
        event = profile_pb.Event(
            event_id=interaction.event_id,
            customer_id=interaction.customer_id,
            channel=profile_pb.CHANNEL_WEB,
            event_type=EVENT_OF_INTERACTION[interaction.interaction_type],
            occur_time=at,
            items=[profile_pb.EventItem(item_id=interaction.item_id, quantity=1)],
        )
        if interaction.interaction_type == profile_pb.INTERACTION_TYPE_PURCHASE:
            event.order_id = f"order-{interaction.event_id}"
            event.value_micros = 1_000_000_000
            event.currency_code = "JPY"
        events.append(event)
    return events


async def load(
    data: TrainingData,
    addresses: Addresses,
    tokens: dict[str, str],
    concurrency: int = 8,
    deadline_seconds: float = 120.0,
) -> dict[str, float]:
    """Loads `data` into the running services; returns the seconds each part took."""
    storefront = bearer(tokens["service:storefront"])
    catalog = bearer(tokens["service:catalog"])
    seconds: dict[str, float] = {}
    async with (
        grpc.aio.insecure_channel(addresses.consent) as consent_channel,
        grpc.aio.insecure_channel(addresses.profile) as profile_channel,
        grpc.aio.insecure_channel(addresses.recommendation) as recommendation_channel,
    ):
        consent = consent_grpc.ConsentServiceStub(consent_channel)
        profile = profile_grpc.ProfileServiceStub(profile_channel)
        recommendation = pb_grpc.RecommendationServiceStub(recommendation_channel)

        started = time.perf_counter()
        item_batches = [data.items[i : i + BATCH] for i in range(0, len(data.items), BATCH)]
        await in_parallel(
            [
                partial(
                    recommendation.UpsertItems,
                    pb.UpsertItemsRequest(
                        request_id=f"catalog-{n}", items=[item_message(item) for item in batch]
                    ),
                    metadata=catalog,
                    timeout=60,
                )
                for n, batch in enumerate(item_batches)
            ],
            concurrency,
        )
        seconds["catalog"] = time.perf_counter() - started

        started = time.perf_counter()
        await in_parallel(
            [
                partial(_signup, consent, profile, customer, storefront)
                for customer in data.customers.values()
            ],
            concurrency,
        )
        seconds["customers and consents"] = time.perf_counter() - started

        started = time.perf_counter()
        events = events_of(data)
        deadline = time.monotonic() + deadline_seconds
        await in_parallel(
            [
                partial(_ingest, profile, events[i : i + BATCH], storefront, deadline)
                for i in range(0, len(events), BATCH)
            ],
            concurrency,
        )
        seconds["events"] = time.perf_counter() - started
    return seconds


async def _signup(
    consent: consent_grpc.ConsentServiceStub,
    profile: profile_grpc.ProfileServiceStub,
    customer: CustomerAttributes,
    metadata: Metadata,
) -> None:
    await profile.CreateCustomer(customer_request(customer), metadata=metadata, timeout=60)
    await consent.GrantConsent(grant_request(customer.customer_id), metadata=metadata, timeout=60)


async def _ingest(
    profile: profile_grpc.ProfileServiceStub,
    events: list[profile_pb.Event],
    metadata: Metadata,
    deadline: float,
) -> None:
    """Sends the events until each is accepted (a retry of an accepted one is a DUPLICATE)."""
    while True:
        answer = await profile.IngestEvents(
            profile_pb.IngestEventsRequest(events=events), metadata=metadata, timeout=60
        )
        results = list(zip(events, answer.results, strict=True))
        invalid = [result for _, result in results if result.status == profile_pb.EVENT_RESULT_STATUS_INVALID]
        if invalid:
            raise ValueError(f"profile refused an event: {invalid[0]}")
        pending = [event for event, result in results if result.status not in ACCEPTED]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"events not accepted: {answer.results[0]}")
        events = pending
        await asyncio.sleep(0.2)
