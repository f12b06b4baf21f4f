"""Data-subject requests fanned out by consent to every service, as real processes."""

from __future__ import annotations

import time

import grpc
import pytest
from google.protobuf import json_format
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as repl_grpc

from tests.e2e.conftest import Suite
from tests.e2e.test_suite_resources import _device_request

CUSTOMER = "dsr-customer"
SERVICES = ["consent", "profile", "recommendation", "replenishment"]


def _give_the_customer_data(suite: Suite) -> None:
    with grpc.insecure_channel(suite.address("profile")) as channel:
        profile_grpc.ProfileServiceStub(channel).CreateCustomer(
            profile_pb.CreateCustomerRequest(
                request_id="dsr-create",
                customer_id=CUSTOMER,
                customer=profile_pb.Customer(
                    display_name="Mio Kato", email="mio@example.com", region="JP-01"
                ),
            ),
            metadata=suite.auth(),
            timeout=10,
        )
    with grpc.insecure_channel(suite.address("consent")) as channel:
        consent_grpc.ConsentServiceStub(channel).GrantConsent(
            consent_pb.GrantConsentRequest(
                customer_id=CUSTOMER,
                purpose="personalize.recommendations",
                data_categories=["user.behavior.purchase_history"],
                notice_version=1,
                collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
                jurisdiction="JP",
                request_id="dsr-grant",
            ),
            metadata=suite.auth("service:storefront"),
            timeout=10,
        )
    request = _device_request()
    request.customer_id = CUSTOMER
    with grpc.insecure_channel(suite.address("replenishment")) as channel:
        repl_grpc.ReplenishmentServiceStub(channel).RegisterDevice(
            request, metadata=suite.auth("service:storefront"), timeout=10
        )


def _wait_done(stub, request_id: str, metadata, timeout: float = 60) -> consent_pb.DataSubjectRequest:
    """Follows the request until it finishes (it runs in the background), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = stub.GetDataSubjectRequest(
            consent_pb.GetDataSubjectRequestRequest(data_subject_request_id=request_id),
            metadata=metadata,
            timeout=10,
        ).data_subject_request
        if found.state in (
            consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED,
            consent_pb.DATA_SUBJECT_REQUEST_STATE_FAILED,
        ):
            return found
    raise AssertionError(f"data-subject request {request_id} did not finish in {timeout} s")


@pytest.fixture
def suite(tmp_path):
    running = Suite(tmp_path).start_all()
    yield running
    running.stop_all()


def test_export_gathers_every_service_and_erasure_removes_the_customer_everywhere(suite: Suite):
    _give_the_customer_data(suite)
    crm = suite.auth("service:crm")
    with grpc.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        create = consent_pb.CreateDataSubjectRequestRequest(
            customer_id=CUSTOMER, type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, request_id="export-1"
        )
        created = stub.CreateDataSubjectRequest(create, metadata=crm, timeout=10).data_subject_request
        assert stub.CreateDataSubjectRequest(create, metadata=crm, timeout=10).data_subject_request == created
        export = _wait_done(stub, created.data_subject_request_id, crm)
        assert export.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED
        assert [s.service for s in export.services] == SERVICES
        document = json_format.MessageToDict(export.export_document)
        assert set(document["services"]) == set(SERVICES)
        assert "mio@example.com" in str(document["services"]["profile"])  # the subject sees their own PII
        assert document["services"]["consent"]["consents"][0]["purpose"] == "personalize.recommendations"
        assert "SN-E2E-1" in str(document["services"]["replenishment"])

        erase = stub.CreateDataSubjectRequest(
            consent_pb.CreateDataSubjectRequestRequest(
                customer_id=CUSTOMER, type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_ERASE, request_id="erase-1"
            ),
            metadata=crm,
            timeout=10,
        ).data_subject_request
        erased = _wait_done(stub, erase.data_subject_request_id, crm)
        assert erased.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED
        assert erased.customer_id.startswith("erased:")
        parts = {s.service: dict(s.erased_records) for s in erased.services}
        assert parts["consent"]["consents"] == 1 and parts["profile"]

        state = stub.GetConsentState(
            consent_pb.GetConsentStateRequest(customer_id=CUSTOMER), metadata=crm, timeout=10
        )
        assert all(c.status == consent_pb.CONSENT_STATUS_NOT_GIVEN for c in state.consents)
        verified = stub.VerifyAuditLog(consent_pb.VerifyAuditLogRequest(), metadata=suite.auth(), timeout=10)
        assert verified.valid and verified.entries_checked > 0
        trail = stub.ListAuditEntries(
            consent_pb.ListAuditEntriesRequest(customer_id=CUSTOMER, page_size=1000),
            metadata=suite.auth(),
            timeout=10,
        )
        assert trail.entries and all(e.customer_id.startswith("erased:") for e in trail.entries)
    with grpc.insecure_channel(suite.address("profile")) as channel:
        with pytest.raises(grpc.RpcError) as gone:
            profile_grpc.ProfileServiceStub(channel).GetCustomer(
                profile_pb.GetCustomerRequest(customer_id=CUSTOMER), metadata=suite.auth(), timeout=10
            )
        assert gone.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_service_that_is_down_is_retried_until_it_answers(suite: Suite):
    _give_the_customer_data(suite)
    assert suite.processes["profile"].terminate() == 0
    with grpc.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        created = stub.CreateDataSubjectRequest(
            consent_pb.CreateDataSubjectRequestRequest(
                customer_id=CUSTOMER, type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_ERASE, request_id="erase-down"
            ),
            metadata=suite.auth(),
            timeout=10,
        ).data_subject_request
        deadline = time.monotonic() + 30
        while True:  # until profile's part has failed at least twice
            found = stub.GetDataSubjectRequest(
                consent_pb.GetDataSubjectRequestRequest(
                    data_subject_request_id=created.data_subject_request_id
                ),
                metadata=suite.auth(),
                timeout=10,
            ).data_subject_request
            profile_part = next(s for s in found.services if s.service == "profile")
            if profile_part.attempts >= 2:
                break
            assert time.monotonic() < deadline, "profile's part was not retried"
            time.sleep(0.1)  # polling interval, as in _wait_done
        assert found.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_IN_PROGRESS
        assert profile_part.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_IN_PROGRESS
        assert profile_part.last_error.startswith("UNAVAILABLE")
        suite.start("profile")  # on the port consent knows
        done = _wait_done(stub, created.data_subject_request_id, suite.auth())
        assert done.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED
        assert next(s for s in done.services if s.service == "profile").attempts >= 3
