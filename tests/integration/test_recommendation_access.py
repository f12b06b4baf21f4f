"""Who may call the recommendation service, and what it does not do yet."""

from __future__ import annotations

import grpc
import pytest
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from tests.conftest import error_reason, rpc_error

ITEM = pb.Item(item_id="sku-1", title="Coffee beans", available=True)


async def test_only_admin_and_the_catalog_feed_write_the_catalog(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    for n, principal in enumerate(["service:storefront", "service:campaign", "service:profile"]):
        error = await rpc_error(
            stub.UpsertItems(
                pb.UpsertItemsRequest(request_id=f"r{n}", items=[ITEM]), metadata=service.auth(principal)
            )
        )
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert error_reason(error) == "PRINCIPAL_NOT_ALLOWED"
    for n, principal in enumerate(["service:catalog", "admin"]):
        written = await stub.UpsertItems(
            pb.UpsertItemsRequest(request_id=f"ok{n}", items=[ITEM]), metadata=service.auth(principal)
        )
        assert len(written.results) == 1


async def test_storefronts_campaigns_and_the_catalog_feed_read_the_catalog(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    await stub.UpsertItems(pb.UpsertItemsRequest(request_id="seed", items=[ITEM]), metadata=service.auth())
    for principal in ["service:storefront", "service:campaign", "service:catalog", "admin"]:
        got = await stub.GetItem(pb.GetItemRequest(item_id="sku-1"), metadata=service.auth(principal))
        assert got.item.title == ITEM.title
        listed = await stub.ListItems(pb.ListItemsRequest(), metadata=service.auth(principal))
        assert [i.item_id for i in listed.items] == ["sku-1"]
    for call in (
        stub.GetItem(pb.GetItemRequest(item_id="sku-1"), metadata=service.auth("service:profile")),
        stub.ListItems(pb.ListItemsRequest(), metadata=service.auth("service:replenishment")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_calls_without_a_valid_token_are_unauthenticated(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    for metadata in [(), (("authorization", "Bearer not-a-token"),)]:
        error = await rpc_error(stub.GetItem(pb.GetItemRequest(item_id="sku-1"), metadata=metadata))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_model_rpcs_are_refused_to_callers_the_proto_does_not_list(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    for call in (
        stub.TrainModel(pb.TrainModelRequest(request_id="t1"), metadata=service.auth("service:storefront")),
        stub.ActivateModel(
            pb.ActivateModelRequest(model_version="m-1"), metadata=service.auth("service:catalog")
        ),
        stub.Recommend(pb.RecommendRequest(), metadata=service.auth("service:catalog")),
        stub.DeleteItem(pb.DeleteItemRequest(item_id="sku-1"), metadata=service.auth("service:storefront")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED


UNIMPLEMENTED = [
    ("DeleteItem", pb.DeleteItemRequest(item_id="sku-1")),
    ("Recommend", pb.RecommendRequest(customer_id="c-1")),
    ("SimilarItems", pb.SimilarItemsRequest(item_id="sku-1")),
]


@pytest.mark.parametrize(("rpc", "request_"), UNIMPLEMENTED, ids=[name for name, _ in UNIMPLEMENTED])
async def test_rpcs_of_later_issues_are_unimplemented_and_say_which(start_service, rpc, request_):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    error = await rpc_error(getattr(stub, rpc)(request_, metadata=service.auth()))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert f"RecommendationService/{rpc}" in (error.details() or "")


async def test_batch_recommend_is_unimplemented_and_says_so(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)

    async def consume() -> None:
        async for _ in stub.BatchRecommend(
            pb.BatchRecommendRequest(customer_ids=["c-1"]), metadata=service.auth("service:campaign")
        ):
            pass

    error = await rpc_error(consume())
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "RecommendationService/BatchRecommend" in (error.details() or "")
