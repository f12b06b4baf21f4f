"""Who may call the recommendation service: the Callers lines of its contract."""

from __future__ import annotations

import grpc
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


async def test_serving_answers_storefronts_campaigns_and_admin_and_no_one_else(start_service):
    service = await start_service("recommendation")
    stub = pb_grpc.RecommendationServiceStub(service.channel)
    await stub.UpsertItems(pb.UpsertItemsRequest(request_id="seed", items=[ITEM]), metadata=service.auth())

    async def batch(principal: str) -> list[pb.BatchRecommendResponse]:
        return [
            response
            async for response in stub.BatchRecommend(
                pb.BatchRecommendRequest(customer_ids=["c-1"]), metadata=service.auth(principal)
            )
        ]

    for principal in ["service:storefront", "service:campaign", "admin"]:
        found = await stub.Recommend(pb.RecommendRequest(customer_id="c-1"), metadata=service.auth(principal))
        assert [item.item_id for item in found.recommendations.items] == ["sku-1"]
        assert [r.recommendations.customer_id for r in await batch(principal)] == ["c-1"]
        similar = await stub.SimilarItems(
            pb.SimilarItemsRequest(item_id="sku-1"), metadata=service.auth(principal)
        )
        assert similar.fallback_reason == pb.FALLBACK_REASON_NO_MODEL
    for principal in ["service:catalog", "service:profile"]:
        for call in (
            stub.Recommend(pb.RecommendRequest(customer_id="c-1"), metadata=service.auth(principal)),
            stub.SimilarItems(pb.SimilarItemsRequest(item_id="sku-1"), metadata=service.auth(principal)),
            batch(principal),
        ):
            error = await rpc_error(call)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    deleted = await stub.DeleteItem(
        pb.DeleteItemRequest(item_id="sku-1"), metadata=service.auth("service:catalog")
    )
    assert deleted.deleted
