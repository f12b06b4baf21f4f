"""Every List and Watch RPC takes back only the page tokens and cursors it issued.

The RPCs with a page token or cursor are found from the services' descriptors (a
request field named page_token or since_cursor): each one a service implements must
have a case below, so a List RPC added later fails this test until it is covered; one
not implemented yet must answer UNIMPLEMENTED. Each case pages with a good token (as
before), then sends the token edited, from another RPC, with other filters, and
random, nested, old-style and huge ones: every one INVALID_ARGUMENT, reason
INVALID_PAGE_TOKEN, naming the field.
"""

from __future__ import annotations

import base64
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as recommendation_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as recommendation_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as replenishment_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as replenishment_grpc

from services.replenishment import lifecycle
from services.replenishment.devices import Registration, settled_registration
from services.replenishment.slots import SlotSettings
from shared.validation import Violations
from tests.conftest import InProcessService, error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import BROWSING, PURCHASES, RECS, grant, withdraw

MODULES = (consent_pb, profile_pb, recommendation_pb, replenishment_pb, privacy_pb)
PAGED_FIELDS = ("page_token", "since_cursor")
SERVICE_OF_PACKAGE = {
    "najimi.consent.v1": "consent",
    "najimi.profile.v1": "profile",
    "najimi.recommendation.v1": "recommendation",
    "najimi.replenishment.v1": "replenishment",
}


def paged_methods() -> dict[str, MethodDescriptor]:
    """Every RPC of every service whose request carries a page token or a cursor."""
    found = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if any(name in method.input_type.fields_by_name for name in PAGED_FIELDS):
                    found[f"{service.full_name}/{method.name}"] = method
    return found


@dataclass
class Case:
    """How to page one RPC: a first-page request (page_size 1 where it has one), the same
    with other filters (None: it has none), and where a good token comes from."""

    request: Message
    other_filters: Message | None = None
    issuer: str = ""  # the RPC whose response gives a good token; "" means this one
    token_field: str = "next_page_token"
    fields: tuple[str, ...] = ("page_token",)
    scope_group: str = ""  # RPCs that share tokens (one feed); "" means this RPC alone


def _stamp(seconds_ago: float) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=int(time.time() - seconds_ago))


CONSENT = "najimi.consent.v1.ConsentService"
PROFILE = "najimi.profile.v1.ProfileService"
RECOMMENDATION = "najimi.recommendation.v1.RecommendationService"
FEED = "interaction-feed"
REPLENISHMENT = "najimi.replenishment.v1.ReplenishmentService"
PAGES_DEVICE = "dev_pages"  # stored by the suite under this id, so a case can name it

CASES: dict[str, Case] = {
    f"{CONSENT}/ListPurposes": Case(consent_pb.ListPurposesRequest(page_size=1)),
    f"{CONSENT}/ListDataCategories": Case(consent_pb.ListDataCategoriesRequest(page_size=1)),
    f"{CONSENT}/ListPrivacyNotices": Case(
        consent_pb.ListPrivacyNoticesRequest(page_size=1),
        consent_pb.ListPrivacyNoticesRequest(page_size=1, purpose=RECS),
    ),
    f"{CONSENT}/ListConsentHistory": Case(
        consent_pb.ListConsentHistoryRequest(customer_id="c-1", page_size=1),
        consent_pb.ListConsentHistoryRequest(customer_id="c-1", page_size=1, purpose=RECS),
    ),
    f"{CONSENT}/ListAuditEntries": Case(
        consent_pb.ListAuditEntriesRequest(page_size=1),
        consent_pb.ListAuditEntriesRequest(page_size=1, customer_id="c-1"),
    ),
    f"{CONSENT}/ListConsentChanges": Case(
        consent_pb.ListConsentChangesRequest(page_size=1),
        consent_pb.ListConsentChangesRequest(page_size=1, purposes=[RECS]),
    ),
    f"{CONSENT}/ListDataSubjectRequests": Case(
        consent_pb.ListDataSubjectRequestsRequest(page_size=1),
        consent_pb.ListDataSubjectRequestsRequest(page_size=1, customer_id="c-1"),
    ),
    f"{PROFILE}/ListCustomers": Case(
        profile_pb.ListCustomersRequest(page_size=1),
        profile_pb.ListCustomersRequest(page_size=1, show_merged=True),
    ),
    f"{PROFILE}/ListIdentities": Case(
        profile_pb.ListIdentitiesRequest(customer_id="c-1", page_size=1),
        profile_pb.ListIdentitiesRequest(
            customer_id="c-1", page_size=1, types=[profile_pb.IDENTIFIER_TYPE_EMAIL]
        ),
    ),
    f"{PROFILE}/ListEvents": Case(
        profile_pb.ListEventsRequest(customer_id="c-1", page_size=1),
        profile_pb.ListEventsRequest(customer_id="c-1", page_size=1, channels=[profile_pb.CHANNEL_WEB]),
    ),
    f"{PROFILE}/ListInteractions": Case(
        profile_pb.ListInteractionsRequest(page_size=1),
        fields=("page_token", "since_cursor"),
        scope_group=FEED,
    ),
    f"{PROFILE}/WatchInteractions": Case(
        profile_pb.WatchInteractionsRequest(),
        issuer=f"{PROFILE}/ListInteractions",
        token_field="resume_cursor",
        fields=("since_cursor",),
        scope_group=FEED,
    ),
    f"{RECOMMENDATION}/ListItems": Case(
        recommendation_pb.ListItemsRequest(page_size=1),
        recommendation_pb.ListItemsRequest(page_size=1, available_only=True),
    ),
    f"{RECOMMENDATION}/ListModels": Case(
        recommendation_pb.ListModelsRequest(page_size=1),
        recommendation_pb.ListModelsRequest(page_size=1, statuses=[recommendation_pb.MODEL_STATUS_FAILED]),
    ),
    f"{REPLENISHMENT}/ListDevices": Case(
        replenishment_pb.ListDevicesRequest(page_size=1),
        replenishment_pb.ListDevicesRequest(page_size=1, show_deregistered=True),
    ),
    f"{REPLENISHMENT}/ListSlots": Case(
        replenishment_pb.ListSlotsRequest(device_id=PAGES_DEVICE, page_size=1),
        replenishment_pb.ListSlotsRequest(device_id="dev_other", page_size=1),
    ),
    f"{REPLENISHMENT}/ListOrders": Case(
        replenishment_pb.ListOrdersRequest(page_size=1),
        replenishment_pb.ListOrdersRequest(page_size=1, customer_id="c-1"),
    ),
    f"{REPLENISHMENT}/ListOrderEvents": Case(
        replenishment_pb.ListOrderEventsRequest(page_size=1),
        replenishment_pb.ListOrderEventsRequest(page_size=1, since_revision=1),
    ),
    f"{REPLENISHMENT}/ListSlotEvents": Case(
        replenishment_pb.ListSlotEventsRequest(page_size=1),
        replenishment_pb.ListSlotEventsRequest(
            page_size=1, types=[replenishment_pb.SLOT_EVENT_TYPE_DEVICE_REGISTERED]
        ),
    ),
}


class Suite:
    """consent, profile (following that consent), recommendation and replenishment, sharing
    one data directory (and so one page-token key), with enough data for two pages of each
    List RPC."""

    def __init__(self, services: dict[str, InProcessService]):
        self.services = services

    def call(self, path: str, request: Message) -> Any:
        """Calls the RPC `path` as admin: a unary call, or the first message of a stream."""
        method = paged_methods()[path]
        service = self.services[SERVICE_OF_PACKAGE[method.containing_service.file.package]]
        module = next(m for m in MODULES if m.DESCRIPTOR.package == method.containing_service.file.package)
        response_type = getattr(module, method.output_type.name)
        metadata = service.auth("admin")
        if method.server_streaming:
            stream = service.channel.unary_stream(
                f"/{path}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )(request, metadata=metadata)
            return stream.read()
        unary = service.channel.unary_unary(
            f"/{path}",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return unary(request, metadata=metadata)

    async def good_token(self, path: str) -> str:
        case = CASES[path]
        issuer = case.issuer or path
        response = await self.call(issuer, CASES[issuer].request)
        token = getattr(response, case.token_field)
        assert token, f"{issuer} gave no {case.token_field}: the suite holds too little data"
        return token


@pytest.fixture
async def suite(start_service, dev_tokens, database_url) -> Suite:
    shared_database = database_url if database_url.startswith("postgresql") else None
    # No other service takes part in data-subject requests here: they complete at once.
    consent = await start_service("consent", shared_database, data_subject_services="")
    profile = await start_service(
        "profile",
        database_url,
        consent_address=f"127.0.0.1:{consent.running.port}",
        service_token=dev_tokens["service:profile"],
    )
    recommendation = await start_service("recommendation", shared_database)
    replenishment = await start_service("replenishment", shared_database)
    cache = profile.running.app.registrations[0].servicer.consent
    assert await cache.wait_synced(10)

    admin = consent.auth("admin")
    consents = consent_grpc.ConsentServiceStub(consent.channel)
    await consents.GrantConsent(grant(request_id="g-1"), metadata=admin)
    await consents.WithdrawConsent(withdraw(request_id="w-1"), metadata=admin)
    granted = await consents.GrantConsent(
        grant(request_id="g-2", categories=(PURCHASES, BROWSING)), metadata=admin
    )
    assert await cache.wait_for_revision(granted.consent.revision, 5)
    for customer in ("c-1", "c-2"):
        await consents.CreateDataSubjectRequest(
            consent_pb.CreateDataSubjectRequestRequest(
                customer_id=customer,
                type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT,
                request_id=f"dsr-{customer}",
            ),
            metadata=admin,
        )

    profiles = profile_grpc.ProfileServiceStub(profile.channel)
    crm = profile.auth("service:crm")
    for customer in ("c-1", "c-2", "c-3"):
        await profiles.CreateCustomer(
            profile_pb.CreateCustomerRequest(request_id=f"create-{customer}", customer_id=customer),
            metadata=crm,
        )
    for kind, value in (
        (profile_pb.IDENTIFIER_TYPE_EMAIL, "a@example.com"),
        (profile_pb.IDENTIFIER_TYPE_COOKIE_ID, "ck-1"),
    ):
        await profiles.LinkIdentity(
            profile_pb.LinkIdentityRequest(
                request_id=f"link-{kind}",
                customer_id="c-1",
                identifier=profile_pb.Identifier(type=kind, value=value),
            ),
            metadata=crm,
        )
    ingested = await profiles.IngestEvents(
        profile_pb.IngestEventsRequest(
            events=[
                profile_pb.Event(
                    event_id=f"e-{index}",
                    customer_id="c-1",
                    channel=profile_pb.CHANNEL_WEB,
                    event_type=profile_pb.EVENT_TYPE_PRODUCT_VIEW,
                    occur_time=_stamp(60 - index),
                    items=[profile_pb.EventItem(item_id=f"sku-{index}")],
                )
                for index in range(3)
            ]
        ),
        metadata=profile.auth("service:storefront"),
    )
    assert {r.status for r in ingested.results} == {profile_pb.EVENT_RESULT_STATUS_ACCEPTED}

    items = recommendation_grpc.RecommendationServiceStub(recommendation.channel)
    await items.UpsertItems(
        recommendation_pb.UpsertItemsRequest(
            request_id="items-1",
            items=[
                recommendation_pb.Item(item_id=f"sku-{index}", title=f"Item {index}", available=True)
                for index in range(3)
            ],
        ),
        metadata=recommendation.auth("service:catalog"),
    )
    # Two models for two pages: each run is failed at once, freeing the one training slot.
    registry = recommendation.running.app.registrations[0].servicer.registry
    for index in range(2):
        queued, _ = await registry.queue_training(
            "admin",
            recommendation_pb.TrainModelRequest(request_id=f"train-{index}"),
            recommendation_pb.TrainingOptions(),
            True,
        )
        await registry.fail(queued.training_run_id, "TEST", "failed so that another run may queue")
    # Two devices (one under a known id), two slots, two slot events.
    devices = replenishment_grpc.ReplenishmentServiceStub(replenishment.channel)
    store = replenishment.running.app.registrations[0].servicer.store
    registration = settled_registration(
        Violations(),
        Registration(
            "c-1",
            "acme",
            "ink-1",
            "printer",
            "SN-P",
            slots=tuple(
                SlotSettings(
                    slot_id,
                    item_id="ink",
                    capacity=10.0,
                    unit="ml",
                    unit_price_micros=1_000_000,
                    currency_code="EUR",
                )
                for slot_id in ("a", "b")
            ),
        ),
    )

    def store_device(connection: Any) -> None:
        device = store.insert_device(connection, PAGES_DEVICE, registration, "0" * 64)
        lifecycle.registered(connection, device, device.create_time_us)

    await store.db.write(store_device)
    await devices.RegisterDevice(
        replenishment_pb.RegisterDeviceRequest(
            request_id="reg-pages",
            customer_id="c-2",
            manufacturer="acme",
            model="m",
            kind="printer",
            serial_number="S2",
        ),
        metadata=replenishment.auth("service:storefront"),
    )
    # Two orders (and so two order events).
    for slot_id in ("a", "b"):
        await devices.ReplenishSlot(
            replenishment_pb.ReplenishSlotRequest(
                request_id=f"buy-{slot_id}", device_id=PAGES_DEVICE, slot_id=slot_id
            ),
            metadata=replenishment.auth("service:storefront"),
        )
    return Suite(
        {
            "consent": consent,
            "profile": profile,
            "recommendation": recommendation,
            "replenishment": replenishment,
        }
    )


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def edited(token: str) -> list[str]:
    """The token with one byte flipped: in its version, its position and its MAC."""
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    found = []
    for index in (0, len(raw) // 2, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[index] ^= 0x20
        found.append(_b64(bytes(flipped)))
    return found


def forged() -> dict[str, str]:
    """Tokens nobody issued: random, nested, in the old unauthenticated format, huge."""
    nested = "[" * 100_000 + "]" * 100_000
    return {
        "random bytes": _b64(os.urandom(48)),
        "random text": os.urandom(24).hex(),
        "nested JSON": _b64(nested.encode()),
        "nested JSON, short": _b64(("[" * 300 + "]" * 300).encode()),
        "old format": _b64(json.dumps({"after": "x", "filters": {}}).encode()),
        "huge": "A" * 1_000_000,
    }


async def assert_refused(suite: Suite, path: str, request: Message, name: str, token: str, what: str) -> None:
    sent = type(request)()
    sent.CopyFrom(request)
    setattr(sent, name, token)
    error = await rpc_error(suite.call(path, sent))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, name, what, error.details())
    assert error_reason(error) == "INVALID_PAGE_TOKEN", (path, name, what)
    assert name in field_violations(error), (path, name, what)


def test_every_implemented_paged_rpc_has_a_case():
    # Cases must name real RPCs; RPCs without a case are checked to be unimplemented below.
    assert set(CASES) <= set(paged_methods())


async def test_paged_rpcs_without_a_case_are_not_implemented_yet(suite):
    for path in sorted(set(paged_methods()) - set(CASES)):
        method = paged_methods()[path]
        module = next(m for m in MODULES if m.DESCRIPTOR.package == method.containing_service.file.package)
        error = await rpc_error(suite.call(path, getattr(module, method.input_type.name)()))
        assert error.code() == grpc.StatusCode.UNIMPLEMENTED, f"{path} is implemented: add a case to CASES"


async def test_good_tokens_page_as_before(suite):
    for path, case in CASES.items():
        token = await suite.good_token(path)
        for name in case.fields:
            request = type(case.request)()
            request.CopyFrom(case.request)
            setattr(request, name, token)
            first = await suite.call(path, case.request)
            following = await suite.call(path, request)
            if path.endswith("WatchInteractions"):
                continue  # a stream from a good cursor: its first message arrived
            assert following.SerializeToString() != first.SerializeToString(), (path, name)


async def test_tampered_and_foreign_tokens_are_invalid_page_tokens(suite):
    good = {path: await suite.good_token(path) for path in CASES}
    for path, case in CASES.items():
        for name in case.fields:
            token = good[path]
            tampered = {f"byte flipped ({index})": text for index, text in enumerate(edited(token))}
            tampered |= forged()
            tampered["truncated"] = token[: len(token) // 2]
            for other, other_token in good.items():
                if other != path and (not case.scope_group or CASES[other].scope_group != case.scope_group):
                    tampered[f"from {other}"] = other_token
            for what, text in tampered.items():
                await assert_refused(suite, path, case.request, name, text, what)
            if case.other_filters is not None:
                await assert_refused(suite, path, case.other_filters, name, token, "other filters")


async def test_a_token_outlives_no_key_change(start_service):
    key_a = base64.b64encode(bytes(range(32))).decode()
    key_b = base64.b64encode(bytes(range(1, 33))).decode()
    first = await start_service("consent", page_token_key=key_a)
    page = await consent_grpc.ConsentServiceStub(first.channel).ListPurposes(
        consent_pb.ListPurposesRequest(page_size=1), metadata=first.auth()
    )
    assert page.next_page_token
    # Another replica with the same key reads it; one with another key does not.
    same = await start_service("consent", page_token_key=key_a)
    other = await start_service("consent", page_token_key=key_b)
    request = consent_pb.ListPurposesRequest(page_size=1, page_token=page.next_page_token)
    following = await consent_grpc.ConsentServiceStub(same.channel).ListPurposes(
        request, metadata=same.auth()
    )
    assert following.purposes[0].name != page.purposes[0].name
    error = await rpc_error(
        consent_grpc.ConsentServiceStub(other.channel).ListPurposes(request, metadata=other.auth())
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "INVALID_PAGE_TOKEN"
