"""The recommendation service's DataSubjectService over real gRPC, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, field_violations, rpc_error


async def _recommendation(start_service, database_url=None):
    service = await start_service("recommendation", database_url)
    return service, privacy_grpc.DataSubjectServiceStub(service.channel)


async def test_export_of_a_customer_without_interactions_holds_nothing(start_service, database_url):
    service, data_subject = await _recommendation(start_service, database_url)
    # Catalog data is about items, not customers: it stays out of the export.
    await pb_grpc.RecommendationServiceStub(service.channel).UpsertItems(
        pb.UpsertItemsRequest(request_id="r", items=[pb.Item(item_id="sku-1", title="Coffee beans")]),
        metadata=service.auth("service:catalog"),
    )
    exported = await data_subject.ExportCustomerData(
        privacy_pb.ExportCustomerDataRequest(customer_id="cus_1", request_id="dsr-1"),
        metadata=service.auth("service:consent"),
    )
    assert exported.service == "recommendation" and exported.export_time.seconds > 1_700_000_000
    document = json_format.MessageToDict(exported.document)
    assert document["customer_id"] == "cus_1" and document["held"] == {}
    assert set(document["not_held_yet"]) == {"model"}


async def test_erasure_is_idempotent_and_erases_nothing_held(start_service, database_url):
    service, data_subject = await _recommendation(start_service, database_url)
    consent = service.auth("service:consent")
    request = privacy_pb.EraseCustomerDataRequest(customer_id="cus_1", request_id="dsr-1")
    erased = await data_subject.EraseCustomerData(request, metadata=consent)
    assert erased.service == "recommendation" and erased.erase_time.seconds > 1_700_000_000
    assert dict(erased.erased_records) == {}
    assert await data_subject.EraseCustomerData(request, metadata=consent) == erased
    later = await data_subject.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id="cus_1", request_id="dsr-2"), metadata=service.auth()
    )
    assert later.erase_time.ToMicroseconds() > erased.erase_time.ToMicroseconds()
    error = await rpc_error(
        data_subject.EraseCustomerData(
            privacy_pb.EraseCustomerDataRequest(customer_id="cus_2", request_id="dsr-1"), metadata=consent
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"


@pytest.mark.parametrize("principal", ["service:storefront", "service:profile", "service:catalog"])
async def test_only_admin_and_consent_may_call(start_service, principal):
    service, data_subject = await _recommendation(start_service)
    for call in (
        data_subject.ExportCustomerData(
            privacy_pb.ExportCustomerDataRequest(customer_id="c", request_id="r"),
            metadata=service.auth(principal),
        ),
        data_subject.EraseCustomerData(
            privacy_pb.EraseCustomerDataRequest(customer_id="c", request_id="r"),
            metadata=service.auth(principal),
        ),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"


@pytest.mark.parametrize(
    ("customer_id", "request_id", "fields"),
    [
        ("", "r", {"customer_id"}),
        ("c/1", "r", {"customer_id"}),
        ("c" * 129, "r", {"customer_id"}),
        ("c", "", {"request_id"}),
        ("", "r" * 65, {"customer_id", "request_id"}),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(start_service, customer_id, request_id, fields):
    service, data_subject = await _recommendation(start_service)
    for call in (
        data_subject.ExportCustomerData(
            privacy_pb.ExportCustomerDataRequest(customer_id=customer_id, request_id=request_id),
            metadata=service.auth(),
        ),
        data_subject.EraseCustomerData(
            privacy_pb.EraseCustomerDataRequest(customer_id=customer_id, request_id=request_id),
            metadata=service.auth(),
        ),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert set(field_violations(error)) == fields
