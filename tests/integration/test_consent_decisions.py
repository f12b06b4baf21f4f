"""Granting, withdrawing, checking and reading consent through a real consent server."""

from __future__ import annotations

import asyncio
import time

import grpc
from google.protobuf import timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error

RECS = "personalize.recommendations"
PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"


def grant(
    customer="c-1",
    purpose=RECS,
    categories=(PURCHASES, BROWSING),
    request_id="g-1",
    jurisdiction="DE",
    **extra,
):
    return pb.GrantConsentRequest(
        customer_id=customer,
        purpose=purpose,
        data_categories=list(categories),
        notice_version=extra.pop("notice_version", 1),
        collection_method=pb.COLLECTION_METHOD_WEB_FORM,
        jurisdiction=jurisdiction,
        request_id=request_id,
        **extra,
    )


def withdraw(customer="c-1", purpose=RECS, categories=(), request_id="w-1"):
    return pb.WithdrawConsentRequest(
        customer_id=customer,
        purpose=purpose,
        data_categories=list(categories),
        collection_method=pb.COLLECTION_METHOD_MOBILE_APP,
        jurisdiction="DE",
        request_id=request_id,
    )


async def test_grant_check_withdraw_round_trip(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    storefront = consent.auth("service:storefront")
    check = pb.CheckConsentRequest(customer_id="c-1", purpose=RECS, data_categories=[PURCHASES])
    before = await stub.CheckConsent(check, metadata=storefront)
    assert not before.allowed and before.reason == pb.CONSENT_CHECK_REASON_NOT_GIVEN

    granted = await stub.GrantConsent(grant(), metadata=storefront)
    assert granted.consent.status == pb.CONSENT_STATUS_GRANTED
    assert sorted(granted.consent.granted_data_categories) == sorted([PURCHASES, BROWSING])
    assert granted.receipt.receipt_id and granted.receipt.signature
    assert (await stub.GrantConsent(grant(), metadata=storefront)) == granted  # same request id: same answer
    # The same request id for a different request is refused, not answered with the first reply.
    for reused in (grant(categories=(PURCHASES,)), grant(customer="c-2")):
        error = await rpc_error(stub.GrantConsent(reused, metadata=storefront))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
        assert "request_id" in field_violations(error)

    allowed = await stub.CheckConsent(check, metadata=storefront)
    assert allowed.allowed and allowed.reason == pb.CONSENT_CHECK_REASON_ALLOWED
    assert allowed.decided_at_revision >= granted.consent.revision
    partial = await stub.CheckConsent(
        pb.CheckConsentRequest(
            customer_id="c-1", purpose=RECS, data_categories=[PURCHASES, "user.demographic.gender"]
        ),
        metadata=storefront,
    )
    assert not partial.allowed and partial.reason == pb.CONSENT_CHECK_REASON_CATEGORY_NOT_GRANTED
    assert list(partial.allowed_data_categories) == [PURCHASES]
    assert list(partial.denied_data_categories) == ["user.demographic.gender"]

    narrowed = await stub.WithdrawConsent(
        withdraw(categories=[BROWSING], request_id="w-0"), metadata=storefront
    )
    assert narrowed.consent.status == pb.CONSENT_STATUS_GRANTED
    assert list(narrowed.consent.granted_data_categories) == [PURCHASES]
    withdrawn = await stub.WithdrawConsent(withdraw(), metadata=storefront)
    assert withdrawn.consent.status == pb.CONSENT_STATUS_WITHDRAWN
    refused = await stub.CheckConsent(check, metadata=storefront)
    assert not refused.allowed and refused.reason == pb.CONSENT_CHECK_REASON_WITHDRAWN
    assert refused.decided_at_revision == withdrawn.consent.revision

    state = await stub.GetConsentState(pb.GetConsentStateRequest(customer_id="c-1"), metadata=storefront)
    by_purpose = {c.purpose: c for c in state.consents}
    assert by_purpose[RECS].status == pb.CONSENT_STATUS_WITHDRAWN
    assert by_purpose["analytics"].status == pb.CONSENT_STATUS_NOT_GIVEN
    history = await stub.ListConsentHistory(
        pb.ListConsentHistoryRequest(customer_id="c-1"), metadata=storefront
    )
    assert [r.decision for r in history.records] == [
        pb.CONSENT_DECISION_WITHDRAWN,
        pb.CONSENT_DECISION_GRANTED,
        pb.CONSENT_DECISION_GRANTED,
    ]
    assert list(history.records[1].withdrawn_data_categories) == [BROWSING]
    assert history.records[0].actor == "service:storefront"


async def test_consent_survives_a_restart(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    await stub.GrantConsent(grant(), metadata=consent.auth())
    await consent.running.stop(0)
    again = await start_service("consent", database_url)
    check = await pb_grpc.ConsentServiceStub(again.channel).CheckConsent(
        pb.CheckConsentRequest(customer_id="c-1", purpose=RECS), metadata=again.auth()
    )
    assert check.allowed and sorted(check.allowed_data_categories) == sorted([PURCHASES, BROWSING])


async def test_expiry_needs_no_job(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    soon = timestamp_pb2.Timestamp()
    soon.FromMicroseconds(int(time.time() * 1_000_000) + 1_500_000)
    granted = await stub.GrantConsent(grant(expire_time=soon), metadata=consent.auth())
    assert granted.consent.expire_time == soon
    check = pb.CheckConsentRequest(customer_id="c-1", purpose=RECS)
    assert (await stub.CheckConsent(check, metadata=consent.auth())).allowed
    # Expiry is a matter of the clock alone: let it pass, with no job or change in between.
    await asyncio.sleep(max(0.0, soon.ToMicroseconds() / 1e6 - time.time()) + 0.05)
    expired = await stub.CheckConsent(check, metadata=consent.auth())
    # The feed also says so soon after, for watchers that keep no clock of their own.
    watch = stub.WatchConsentChanges(
        pb.WatchConsentChangesRequest(since_revision=granted.consent.revision), metadata=consent.auth()
    )
    async for message in watch:
        if message.HasField("change"):
            assert (
                message.change.kind == pb.CONSENT_CHANGE_KIND_EXPIRED and message.change.customer_id == "c-1"
            )
            break
    watch.cancel()
    assert not expired.allowed and expired.reason == pb.CONSENT_CHECK_REASON_EXPIRED


async def test_a_material_notice_outdates_earlier_consent_and_keeps_history(start_service, database_url):
    consent = await start_service("consent", database_url)
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    await stub.GrantConsent(grant(), metadata=consent.auth())
    minor = await stub.CreatePrivacyNotice(
        pb.CreatePrivacyNoticeRequest(
            notice=pb.PrivacyNotice(purpose=RECS, text="Typo fixed.", material=False), request_id="n-2"
        ),
        metadata=consent.auth(),
    )
    assert minor.notice.version == 2 and minor.revision == 0
    check = pb.CheckConsentRequest(customer_id="c-1", purpose=RECS)
    assert (await stub.CheckConsent(check, metadata=consent.auth())).allowed
    material = await stub.CreatePrivacyNotice(
        pb.CreatePrivacyNoticeRequest(
            notice=pb.PrivacyNotice(purpose=RECS, text="We now also use store visits.", material=True),
            request_id="n-3",
        ),
        metadata=consent.auth(),
    )
    assert material.notice.version == 3 and material.revision > 0
    renewal = await stub.CheckConsent(check, metadata=consent.auth())
    assert not renewal.allowed and renewal.reason == pb.CONSENT_CHECK_REASON_NEEDS_RENEWAL
    outdated = await rpc_error(
        stub.GrantConsent(grant(request_id="g-old", notice_version=1), metadata=consent.auth())
    )
    assert outdated.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(outdated) == "NOTICE_VERSION_OUTDATED"
    renewed = await stub.GrantConsent(grant(request_id="g-new", notice_version=3), metadata=consent.auth())
    assert renewed.consent.status == pb.CONSENT_STATUS_GRANTED
    history = await stub.ListConsentHistory(
        pb.ListConsentHistoryRequest(customer_id="c-1"), metadata=consent.auth()
    )
    assert [r.notice_version for r in history.records] == [3, 1]


async def test_set_consents_records_a_form_with_one_receipt(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    response = await stub.SetConsents(
        pb.SetConsentsRequest(
            customer_id="c-2",
            decisions=[
                pb.ConsentDecisionInput(
                    purpose=RECS,
                    decision=pb.CONSENT_DECISION_GRANTED,
                    data_categories=[PURCHASES],
                    notice_version=1,
                ),
                pb.ConsentDecisionInput(purpose="analytics", decision=pb.CONSENT_DECISION_WITHDRAWN),
            ],
            collection_method=pb.COLLECTION_METHOD_STORE,
            jurisdiction="JP-13",
            request_id="form-1",
        ),
        metadata=consent.auth("service:crm"),
    )
    assert [c.status for c in response.consents] == [pb.CONSENT_STATUS_GRANTED, pb.CONSENT_STATUS_WITHDRAWN]
    assert [p.purpose for p in response.receipt.purposes] == [RECS, "analytics"]
    verified = await stub.VerifyReceipt(
        pb.VerifyReceiptRequest(receipt=response.receipt), metadata=consent.auth()
    )
    assert verified.valid
    stored = await stub.GetConsentReceipt(
        pb.GetConsentReceiptRequest(receipt_id=response.receipt.receipt_id), metadata=consent.auth()
    )
    assert stored.receipt.payload == response.receipt.payload
    batch = await stub.BatchCheckConsent(
        pb.BatchCheckConsentRequest(
            checks=[
                pb.ConsentCheck(customer_id="c-2", purpose=RECS, data_categories=[PURCHASES]),
                pb.ConsentCheck(customer_id="c-2", purpose="analytics"),
                pb.ConsentCheck(customer_id="nobody", purpose=RECS),
            ]
        ),
        metadata=consent.auth("service:profile"),
    )
    assert [r.allowed for r in batch.results] == [True, False, False]
    assert {r.decided_at_revision for r in batch.results} == {batch.revision}


async def test_explain_data_use_says_what_is_used_and_by_whom(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    await stub.GrantConsent(grant(categories=[PURCHASES]), metadata=consent.auth())
    explained = await stub.ExplainDataUse(
        pb.ExplainDataUseRequest(customer_id="c-1"), metadata=consent.auth()
    )
    by_purpose = {p.purpose: p for p in explained.purposes}
    recs = by_purpose[RECS]
    assert recs.allowed and [c.name for c in recs.data_categories] == [PURCHASES]
    assert {u.service for u in recs.data_uses} == {"profile", "recommendation"}
    assert all(list(u.data_categories) == [PURCHASES] for u in recs.data_uses)
    assert recs.notice_url and recs.notice_version == 1
    assert not by_purpose["analytics"].allowed and not by_purpose["analytics"].data_categories


async def test_bad_decisions_name_their_field(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    cases = [
        (grant(customer=""), "customer_id"),
        (grant(purpose="no.such.purpose"), "purpose"),
        (grant(categories=["user.contact"]), "data_categories[0]"),
        (grant(categories=[]), "data_categories"),
        (grant(notice_version=0), "notice_version"),
        (grant(notice_version=9), "notice_version"),
        (grant(request_id="bad id"), "request_id"),
        (
            pb.GrantConsentRequest(
                customer_id="c",
                purpose=RECS,
                data_categories=[PURCHASES],
                notice_version=1,
                jurisdiction="DE",
                request_id="r",
            ),
            "collection_method",
        ),
        (grant(jurisdiction="Germany"), "jurisdiction"),
    ]
    for request, field in cases:
        error = await rpc_error(stub.GrantConsent(request, metadata=consent.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in field_violations(error), (field, field_violations(error))
    for request, field in [
        (pb.CheckConsentRequest(customer_id="", purpose=RECS), "customer_id"),
        (pb.CheckConsentRequest(customer_id="c", purpose="nope"), "purpose"),
        (
            pb.CheckConsentRequest(customer_id="c", purpose=RECS, data_categories=["nope"]),
            "data_categories[0]",
        ),
    ]:
        error = await rpc_error(stub.CheckConsent(request, metadata=consent.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(error)
    error = await rpc_error(stub.BatchCheckConsent(pb.BatchCheckConsentRequest(), metadata=consent.auth()))
    assert "checks" in field_violations(error)
    error = await rpc_error(
        stub.ListConsentChanges(pb.ListConsentChangesRequest(since_revision=10**9), metadata=consent.auth())
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_AHEAD"


async def test_devices_and_non_admins_are_kept_out(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    denied = await rpc_error(
        stub.VerifyAuditLog(pb.VerifyAuditLogRequest(), metadata=consent.auth("service:storefront"))
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    notice = await rpc_error(
        stub.CreatePrivacyNotice(
            pb.CreatePrivacyNoticeRequest(notice=pb.PrivacyNotice(purpose=RECS, text="x"), request_id="n"),
            metadata=consent.auth("service:storefront"),
        )
    )
    assert notice.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_admin_adds_a_purpose_that_customers_can_then_consent_to(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    created = await stub.CreatePurpose(
        pb.CreatePurposeRequest(
            request_id="p-1",
            purpose=pb.Purpose(
                name="personalize.store_layout",
                display_name="Store layout",
                description="We arrange your local store by what customers like you buy.",
                data_categories=[PURCHASES, "user.behavior.store_visits"],
                data_uses=[
                    pb.ServiceDataUse(service="profile", data_categories=[PURCHASES], description="Counts.")
                ],
            ),
        ),
        metadata=consent.auth(),
    )
    assert created.purpose.name == "personalize.store_layout"
    unknown = await rpc_error(
        stub.CreatePurpose(
            pb.CreatePurposeRequest(
                request_id="p-2",
                purpose=pb.Purpose(
                    name="x.y", display_name="X", description="Y", data_categories=["user.nope"]
                ),
            ),
            metadata=consent.auth(),
        )
    )
    assert (
        unknown.code() == grpc.StatusCode.INVALID_ARGUMENT
        and error_reason(unknown) == "UNKNOWN_DATA_CATEGORY"
    )
    no_notice = await rpc_error(
        stub.GrantConsent(
            grant(purpose="personalize.store_layout", categories=[PURCHASES]), metadata=consent.auth()
        )
    )
    assert "notice_version" in field_violations(no_notice)  # consent needs a notice first
    await stub.CreatePrivacyNotice(
        pb.CreatePrivacyNoticeRequest(
            notice=pb.PrivacyNotice(purpose="personalize.store_layout", text="How we use it.", material=True),
            request_id="n-1",
        ),
        metadata=consent.auth(),
    )
    granted = await stub.GrantConsent(
        grant(purpose="personalize.store_layout", categories=[PURCHASES], request_id="g-layout"),
        metadata=consent.auth(),
    )
    assert granted.consent.status == pb.CONSENT_STATUS_GRANTED


async def test_a_receipt_altered_in_any_byte_fails_verification(start_service):
    consent = await start_service("consent")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    receipt = (await stub.GrantConsent(grant(), metadata=consent.auth())).receipt
    assert (await stub.VerifyReceipt(pb.VerifyReceiptRequest(receipt=receipt), metadata=consent.auth())).valid
    for position in range(0, len(receipt.payload), max(1, len(receipt.payload) // 25)):
        altered = pb.ConsentReceipt()
        altered.CopyFrom(receipt)
        payload = bytearray(receipt.payload)
        payload[position] ^= 0x01
        altered.payload = bytes(payload)
        verdict = await stub.VerifyReceipt(pb.VerifyReceiptRequest(receipt=altered), metadata=consent.auth())
        assert not verdict.valid, position
    widened = pb.ConsentReceipt()
    widened.CopyFrom(receipt)
    widened.purposes[0].data_categories.append("user.contact")
    assert not (
        await stub.VerifyReceipt(pb.VerifyReceiptRequest(receipt=widened), metadata=consent.auth())
    ).valid


async def test_data_subject_requests_are_checked_and_private_to_their_creator(start_service):
    consent = await start_service("consent", data_subject_services="")
    stub = pb_grpc.ConsentServiceStub(consent.channel)
    for request, field in [
        (
            pb.CreateDataSubjectRequestRequest(
                customer_id="", type=pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, request_id="r"
            ),
            "customer_id",
        ),
        (pb.CreateDataSubjectRequestRequest(customer_id="c", request_id="r"), "type"),
        (
            pb.CreateDataSubjectRequestRequest(customer_id="c", type=pb.DATA_SUBJECT_REQUEST_TYPE_ERASE),
            "request_id",
        ),
    ]:
        error = await rpc_error(stub.CreateDataSubjectRequest(request, metadata=consent.auth()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and field in field_violations(error)
    created = (
        await stub.CreateDataSubjectRequest(
            pb.CreateDataSubjectRequestRequest(
                customer_id="c-1", type=pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, request_id="mine"
            ),
            metadata=consent.auth("service:crm"),
        )
    ).data_subject_request
    assert [s.service for s in created.services] == ["consent"]
    hidden = await rpc_error(
        stub.GetDataSubjectRequest(
            pb.GetDataSubjectRequestRequest(data_subject_request_id=created.data_subject_request_id),
            metadata=consent.auth("service:storefront"),
        )
    )
    assert hidden.code() == grpc.StatusCode.NOT_FOUND
    listed = await stub.ListDataSubjectRequests(
        pb.ListDataSubjectRequestsRequest(customer_id="c-1"), metadata=consent.auth("service:crm")
    )
    assert [r.data_subject_request_id for r in listed.data_subject_requests] == [
        created.data_subject_request_id
    ]
    others = await stub.ListDataSubjectRequests(
        pb.ListDataSubjectRequestsRequest(), metadata=consent.auth("service:storefront")
    )
    assert not others.data_subject_requests
