"""Times and numbers at and beyond their edges get INVALID_ARGUMENT naming the field.

Each case is a request whose one field holds a value outside protobuf's range (a
Timestamp past 9999 or before year 1, negative nanos, a Duration of the wrong sign) or
outside the field's documented bounds (an expiry in the past, an int64 at its limit, a
NaN), sent through a real server: never INTERNAL, never a value silently stored.
"""

from __future__ import annotations

import math
import time

import grpc
import pytest
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as recommendation_pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as recommendation_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as replenishment_pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as replenishment_grpc

from shared.proto_time import MAX_SECONDS, MIN_SECONDS
from tests.conftest import error_reason, field_violations, rpc_error
from tests.integration.test_consent_decisions import RECS, grant
from tests.integration.test_replenishment_devices import _registration, _slot

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)

# Timestamps protobuf does not allow, and one it allows that no field here accepts.
BAD_TIMESTAMPS = {
    "after 9999": timestamp_pb2.Timestamp(seconds=MAX_SECONDS + 1),
    "before year 1": timestamp_pb2.Timestamp(seconds=MIN_SECONDS - 1),
    "int64 max seconds": timestamp_pb2.Timestamp(seconds=INT64_MAX),
    "int64 min seconds": timestamp_pb2.Timestamp(seconds=INT64_MIN),
    "negative nanos": timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600, nanos=-1),
    "nanos of a second": timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600, nanos=1_000_000_000),
}
BAD_DURATIONS = {
    "beyond 10000 years": duration_pb2.Duration(seconds=315_576_000_001),
    "int64 max seconds": duration_pb2.Duration(seconds=INT64_MAX),
    "int64 min seconds": duration_pb2.Duration(seconds=INT64_MIN),
    "nanos of the wrong sign": duration_pb2.Duration(seconds=10, nanos=-1),
    "nanos of a second": duration_pb2.Duration(seconds=10, nanos=1_000_000_000),
    "negative": duration_pb2.Duration(seconds=-10),
}


def assert_invalid(error: grpc.aio.AioRpcError, field: str) -> None:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.code(), error.details())
    assert field in field_violations(error), (field, field_violations(error))


# -- consent ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(BAD_TIMESTAMPS))
async def test_grant_and_set_consents_refuse_bad_expiries(start_service, label):
    consent = await start_service("consent")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    bad = BAD_TIMESTAMPS[label]
    assert_invalid(
        await rpc_error(stub.GrantConsent(grant(expire_time=bad), metadata=consent.auth())), "expire_time"
    )
    decisions = consent_pb.SetConsentsRequest(
        customer_id="c-1",
        decisions=[
            consent_pb.ConsentDecisionInput(
                purpose=RECS,
                decision=consent_pb.CONSENT_DECISION_GRANTED,
                data_categories=["user.behavior.purchase_history"],
                notice_version=1,
                expire_time=bad,
            )
        ],
        collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
        jurisdiction="DE",
        request_id="set-1",
    )
    assert_invalid(
        await rpc_error(stub.SetConsents(decisions, metadata=consent.auth())), "decisions[0].expire_time"
    )
    # Nothing was recorded.
    state = await stub.GetConsentState(
        consent_pb.GetConsentStateRequest(customer_id="c-1", purposes=[RECS]), metadata=consent.auth()
    )
    assert state.consents[0].status == consent_pb.CONSENT_STATUS_NOT_GIVEN


async def test_an_expiry_in_the_past_is_refused_and_a_far_one_kept(start_service):
    consent = await start_service("consent")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    past = timestamp_pb2.Timestamp(seconds=int(time.time()) - 60)
    assert_invalid(
        await rpc_error(stub.GrantConsent(grant(expire_time=past), metadata=consent.auth())), "expire_time"
    )
    last = timestamp_pb2.Timestamp(seconds=MAX_SECONDS, nanos=999_999_999)
    granted = await stub.GrantConsent(grant(expire_time=last), metadata=consent.auth())
    assert granted.consent.expire_time.seconds == MAX_SECONDS


@pytest.mark.parametrize("label", sorted(BAD_TIMESTAMPS))
async def test_create_privacy_notice_refuses_bad_effective_times(start_service, label):
    consent = await start_service("consent")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    request = consent_pb.CreatePrivacyNoticeRequest(
        notice=consent_pb.PrivacyNotice(purpose=RECS, text="v2", effective_time=BAD_TIMESTAMPS[label]),
        request_id="notice-2",
    )
    assert_invalid(
        await rpc_error(stub.CreatePrivacyNotice(request, metadata=consent.auth())), "notice.effective_time"
    )


async def test_a_notice_may_be_scheduled_ahead_but_not_for_ever(start_service):
    consent = await start_service("consent")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    now = int(time.time())
    for seconds, accepted in ((now + 86_400, True), (now + 20 * 366 * 86_400, False), (now - 3600, False)):
        request = consent_pb.CreatePrivacyNoticeRequest(
            notice=consent_pb.PrivacyNotice(
                purpose="analytics", text="v", effective_time=timestamp_pb2.Timestamp(seconds=seconds)
            ),
            request_id=f"notice-{seconds}",
        )
        if accepted:
            created = await stub.CreatePrivacyNotice(request, metadata=consent.auth())
            assert created.notice.effective_time.seconds == seconds
        else:
            assert_invalid(
                await rpc_error(stub.CreatePrivacyNotice(request, metadata=consent.auth())),
                "notice.effective_time",
            )


@pytest.mark.parametrize("label", sorted(BAD_DURATIONS))
async def test_durations_out_of_range_are_refused(start_service, label):
    consent = await start_service("consent")
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    bad = BAD_DURATIONS[label]
    watch = stub.WatchConsentChanges(
        consent_pb.WatchConsentChangesRequest(heartbeat_interval=bad), metadata=consent.auth()
    )
    assert_invalid(await rpc_error(watch.read()), "heartbeat_interval")
    purpose = consent_pb.CreatePurposeRequest(
        purpose=consent_pb.Purpose(
            name="marketing.test",
            display_name="Test",
            description="A test purpose",
            data_categories=["user.contact"],
            consent_validity=bad,
        ),
        request_id="purpose-1",
    )
    assert_invalid(
        await rpc_error(stub.CreatePurpose(purpose, metadata=consent.auth())), "purpose.consent_validity"
    )


async def test_revisions_and_sequences_at_the_int64_edges(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = consent_grpc.ConsentServiceStub(consent.channel)
    admin = consent.auth()
    await stub.GrantConsent(grant(), metadata=admin)
    for value in (INT64_MIN, -1):
        assert_invalid(
            await rpc_error(
                stub.ListConsentChanges(
                    consent_pb.ListConsentChangesRequest(since_revision=value), metadata=admin
                )
            ),
            "since_revision",
        )
        watch = stub.WatchConsentChanges(
            consent_pb.WatchConsentChangesRequest(since_revision=value), metadata=admin
        )
        assert_invalid(await rpc_error(watch.read()), "since_revision")
        for call in (
            stub.ListAuditEntries(consent_pb.ListAuditEntriesRequest(start_sequence=value), metadata=admin),
            stub.VerifyAuditLog(consent_pb.VerifyAuditLogRequest(start_sequence=value), metadata=admin),
        ):
            assert_invalid(await rpc_error(call), "start_sequence")
    # Ahead of the feed: OUT_OF_RANGE, as documented, for the list and the watch alike.
    error = await rpc_error(
        stub.ListConsentChanges(
            consent_pb.ListConsentChangesRequest(since_revision=INT64_MAX), metadata=admin
        )
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_AHEAD"
    watch = stub.WatchConsentChanges(
        consent_pb.WatchConsentChangesRequest(since_revision=INT64_MAX), metadata=admin
    )
    error = await rpc_error(watch.read())
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    # The largest sequence reaches the query (a BIGINT) and finds nothing.
    beyond = await stub.ListAuditEntries(
        consent_pb.ListAuditEntriesRequest(start_sequence=INT64_MAX), metadata=admin
    )
    assert list(beyond.entries) == [] and beyond.next_page_token == ""
    verified = await stub.VerifyAuditLog(
        consent_pb.VerifyAuditLogRequest(start_sequence=INT64_MAX, end_sequence=INT64_MAX), metadata=admin
    )
    assert verified.valid
    for version in (-1, INT64_MIN >> 32):
        assert_invalid(
            await rpc_error(
                stub.GetPrivacyNotice(
                    consent_pb.GetPrivacyNoticeRequest(purpose=RECS, version=version), metadata=admin
                )
            ),
            "version",
        )
    for size in (-1, 1001, 2**31 - 1, -(2**31)):
        assert_invalid(
            await rpc_error(
                stub.ListPurposes(consent_pb.ListPurposesRequest(page_size=size), metadata=admin)
            ),
            "page_size",
        )


# -- profile ---------------------------------------------------------------------------------


@pytest.mark.parametrize("label", sorted(BAD_TIMESTAMPS))
async def test_profile_times_out_of_range(consented_profile, label):
    profile, _ = await consented_profile()
    stub = profile_grpc.ProfileServiceStub(profile.channel)
    crm = profile.auth("service:crm")
    bad = BAD_TIMESTAMPS[label]
    created = stub.CreateCustomer(
        profile_pb.CreateCustomerRequest(
            request_id="c-1",
            customer=profile_pb.Customer(
                signup_time=bad,
                attributes={
                    "seen": profile_pb.AttributeValue(point_in_time=bad, data_category="user.contact")
                },
            ),
        ),
        metadata=crm,
    )
    error = await rpc_error(created)
    assert_invalid(error, "customer.signup_time")
    assert_invalid(error, "customer.attributes.seen.point_in_time")
    assert_invalid(
        await rpc_error(
            stub.ListCustomers(profile_pb.ListCustomersRequest(min_update_time=bad), metadata=crm)
        ),
        "min_update_time",
    )
    error = await rpc_error(
        stub.ListEvents(
            profile_pb.ListEventsRequest(customer_id="c-1", start_time=bad, end_time=bad), metadata=crm
        )
    )
    assert_invalid(error, "start_time")
    assert_invalid(error, "end_time")
    event = profile_pb.Event(
        event_id="e-1",
        customer_id="c-1",
        channel=profile_pb.CHANNEL_WEB,
        event_type=profile_pb.EVENT_TYPE_SEARCH,
        search_query="kettle",
        occur_time=bad,
    )
    ingested = await stub.IngestEvents(
        profile_pb.IngestEventsRequest(events=[event]), metadata=profile.auth("service:storefront")
    )
    result = ingested.results[0]
    assert result.status == profile_pb.EVENT_RESULT_STATUS_INVALID
    assert "occur_time" in {v.field for v in result.violations}


@pytest.mark.parametrize("label", sorted(BAD_DURATIONS))
async def test_get_traits_window_out_of_range(consented_profile, label):
    profile, _ = await consented_profile()
    stub = profile_grpc.ProfileServiceStub(profile.channel)
    request = profile_pb.GetTraitsRequest(customer_id="c-1", window=BAD_DURATIONS[label])
    assert_invalid(await rpc_error(stub.GetTraits(request, metadata=profile.auth("service:crm"))), "window")


async def test_profile_numbers_out_of_range(consented_profile):
    profile, _ = await consented_profile()
    stub = profile_grpc.ProfileServiceStub(profile.channel)
    crm = profile.auth("service:crm")
    for value in (math.nan, math.inf, -math.inf):
        request = profile_pb.CreateCustomerRequest(
            request_id="c-1",
            customer=profile_pb.Customer(
                attributes={
                    "score": profile_pb.AttributeValue(double_value=value, data_category="user.contact")
                }
            ),
        )
        assert_invalid(
            await rpc_error(stub.CreateCustomer(request, metadata=crm)),
            "customer.attributes.score.double_value",
        )
    for name, value in (("max_categories", -1), ("max_items", 2**31 - 1), ("page_size", -(2**31))):
        request = profile_pb.GetTraitsRequest(customer_id="c-1") if name != "page_size" else None
        if request is None:
            call = stub.ListEvents(
                profile_pb.ListEventsRequest(customer_id="c-1", page_size=value), metadata=crm
            )
        else:
            setattr(request, name, value)
            call = stub.GetTraits(request, metadata=crm)
        assert_invalid(await rpc_error(call), name)
    base = dict(
        event_id="e-1",
        customer_id="c-1",
        channel=profile_pb.CHANNEL_WEB,
        event_type=profile_pb.EVENT_TYPE_PURCHASE,
        order_id="o-1",
        currency_code="EUR",
        occur_time=timestamp_pb2.Timestamp(seconds=int(time.time())),
    )
    for field, event in (
        (
            "value_micros",
            profile_pb.Event(**base, value_micros=INT64_MAX, items=[profile_pb.EventItem(item_id="a")]),
        ),
        (
            "value_micros",
            profile_pb.Event(**base, value_micros=-1, items=[profile_pb.EventItem(item_id="a")]),
        ),
        (
            "items[0].unit_price_micros",
            profile_pb.Event(
                **base, value_micros=1, items=[profile_pb.EventItem(item_id="a", unit_price_micros=INT64_MAX)]
            ),
        ),
        (
            "items[0].quantity",
            profile_pb.Event(
                **base, value_micros=1, items=[profile_pb.EventItem(item_id="a", quantity=-(2**31))]
            ),
        ),
        (
            "properties.score",
            profile_pb.Event(
                **base,
                value_micros=1,
                items=[profile_pb.EventItem(item_id="a")],
                properties=struct_pb2.Struct(
                    fields={
                        "score": struct_pb2.Value(
                            list_value=struct_pb2.ListValue(values=[struct_pb2.Value(number_value=math.inf)])
                        )
                    }
                ),
            ),
        ),
        (
            "rating_value",
            profile_pb.Event(
                **{**base, "event_type": profile_pb.EVENT_TYPE_RATING},
                rating_value=math.nan,
                items=[profile_pb.EventItem(item_id="a")],
            ),
        ),
    ):
        ingested = await stub.IngestEvents(
            profile_pb.IngestEventsRequest(events=[event]), metadata=profile.auth("service:storefront")
        )
        result = ingested.results[0]
        assert result.status == profile_pb.EVENT_RESULT_STATUS_INVALID, field
        assert field in {v.field for v in result.violations}, (field, result.violations)


# -- recommendation and replenishment --------------------------------------------------------


async def test_item_prices_out_of_range(start_service):
    service = await start_service("recommendation")
    stub = recommendation_grpc.RecommendationServiceStub(service.channel)
    for price in (-1, INT64_MAX, INT64_MIN):
        request = recommendation_pb.UpsertItemsRequest(
            request_id="r-1",
            items=[
                recommendation_pb.Item(item_id="i-1", title="Kettle", price_micros=price, currency_code="EUR")
            ],
        )
        assert_invalid(
            await rpc_error(stub.UpsertItems(request, metadata=service.auth("service:catalog"))),
            "items[0].price_micros",
        )
    assert_invalid(
        await rpc_error(
            stub.ListItems(
                recommendation_pb.ListItemsRequest(page_size=2**31 - 1),
                metadata=service.auth("service:catalog"),
            )
        ),
        "page_size",
    )


@pytest.mark.parametrize(
    ("slot", "field"),
    [
        *[(_slot(lead_time=bad), "slots[0].lead_time") for bad in BAD_DURATIONS.values()],
        *[
            (_slot(limits=replenishment_pb.SlotLimits(period=bad)), "slots[0].limits.period")
            for bad in BAD_DURATIONS.values()
        ],
        (_slot(capacity=math.nan), "slots[0].capacity"),
        (_slot(capacity=math.inf), "slots[0].capacity"),
        (_slot(service_level=math.nan), "slots[0].service_level"),
        (_slot(fallback_reorder_level=-math.inf), "slots[0].fallback_reorder_level"),
        (_slot(reorder_quantity=-(2**31)), "slots[0].reorder_quantity"),
        (_slot(unit_price_micros=INT64_MAX, currency_code="EUR"), "slots[0].unit_price_micros"),
        (_slot(unit_price_micros=INT64_MIN, currency_code="EUR"), "slots[0].unit_price_micros"),
        (
            _slot(
                unit_price_micros=1,
                currency_code="EUR",
                limits=replenishment_pb.SlotLimits(max_spend_micros=INT64_MAX, currency_code="EUR"),
            ),
            "slots[0].limits.max_spend_micros",
        ),
        (
            _slot(limits=replenishment_pb.SlotLimits(max_orders_per_period=-(2**31))),
            "slots[0].limits.max_orders_per_period",
        ),
    ],
)
async def test_slot_numbers_and_durations_out_of_range(start_service, slot, field):
    service = await start_service("replenishment")
    stub = replenishment_grpc.ReplenishmentServiceStub(service.channel)
    request = _registration(slots=[slot])
    assert_invalid(
        await rpc_error(stub.RegisterDevice(request, metadata=service.auth("service:storefront"))), field
    )
