"""PII never reaches the logs: a full run's logs hold none of the personal data it sent."""

from __future__ import annotations

import grpc
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from najimi.profile.v1 import profile_service_pb2_grpc as pb_grpc

from tests.e2e.conftest import Suite
from tests.e2e.test_data_subject_requests import _wait_done
from tests.e2e.test_profile_durability import _wait_until_collecting
from tests.integration.test_consent_decisions import grant
from tests.integration.test_profile_events import BROWSING, PURCHASES, stamp

NAME = "Zephyrine Quillfeather"
EMAIL = "zq.unique-4471@example.org"
PHONE = "+81398765432"
SEARCH = "zq-secret-search-phrase"
CARD = "CARD-ZQ-99871"


def test_a_full_run_logs_none_of_the_pii_it_was_sent(tmp_path):
    suite = Suite(tmp_path, extra_env={"NAJIMI_LOG_LEVEL": "debug"})
    suite.start_all()
    writer = suite.auth("service:storefront")
    try:
        with grpc.insecure_channel(suite.address("consent")) as channel:
            consent_grpc.ConsentServiceStub(channel).GrantConsent(
                grant(customer="c-1", categories=[PURCHASES, BROWSING], request_id="g"),
                metadata=writer,
                timeout=10,
            )
        with grpc.insecure_channel(suite.address("profile")) as channel:
            stub = pb_grpc.ProfileServiceStub(channel)
            stub.CreateCustomer(
                pb.CreateCustomerRequest(
                    request_id="create",
                    customer_id="c-1",
                    customer=pb.Customer(display_name=NAME, email=EMAIL, phone=PHONE, birth_year=1987),
                    identities=[
                        pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value=EMAIL),
                        pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value=CARD),
                    ],
                ),
                metadata=writer,
                timeout=10,
            )
            _wait_until_collecting(stub, writer)
            search = pb.Event(
                event_id="s-1",
                customer_id="c-1",
                channel=pb.CHANNEL_WEB,
                event_type=pb.EVENT_TYPE_SEARCH,
                occur_time=stamp(),
                search_query=SEARCH,
            )
            by_email = pb.Event(
                event_id="v-1",
                identifier=pb.Identifier(type=pb.IDENTIFIER_TYPE_EMAIL, value=EMAIL),
                channel=pb.CHANNEL_WEB,
                event_type=pb.EVENT_TYPE_PRODUCT_VIEW,
                occur_time=stamp(),
                items=[pb.EventItem(item_id="i-1")],
            )
            stub.IngestEvents(pb.IngestEventsRequest(events=[search, by_email]), metadata=writer, timeout=10)
            bad = pb.CreateCustomerRequest(
                request_id="bad", customer=pb.Customer(display_name=NAME, email="not-an-email " + EMAIL)
            )
            try:
                stub.CreateCustomer(bad, metadata=writer, timeout=10)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert (
                stub.GetCustomer(
                    pb.GetCustomerRequest(customer_id="c-1"), metadata=suite.auth(), timeout=10
                ).customer.email
                == EMAIL
            )
            stub.ResolveIdentity(
                pb.ResolveIdentityRequest(
                    identifier=pb.Identifier(type=pb.IDENTIFIER_TYPE_LOYALTY_CARD, value=CARD)
                ),
                metadata=writer,
                timeout=10,
            )
        with grpc.insecure_channel(suite.address("consent")) as channel:
            consent = consent_grpc.ConsentServiceStub(channel)
            created = consent.CreateDataSubjectRequest(
                consent_pb.CreateDataSubjectRequestRequest(
                    customer_id="c-1", type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_EXPORT, request_id="export"
                ),
                metadata=writer,
                timeout=10,
            ).data_subject_request
            exported = _wait_done(consent, created.data_subject_request_id, writer)
            assert EMAIL in str(exported.export_document)  # the subject gets their data back...
    finally:
        suite.stop_all()
    logs = "".join(line for process in suite.processes.values() for line in process.lines)
    assert '"rpc"' in logs and "CreateCustomer" in logs  # the logs did record the calls
    for secret in (NAME, EMAIL, PHONE, SEARCH, CARD):
        assert secret not in logs, f"{secret!r} was logged"  # ...but the logs never see it
