"""RecommendationService over gRPC: protobuf in, domain calls, protobuf out — nothing else.

Implemented so far: the catalog's UpsertItems, GetItem and ListItems. Every other RPC
is left to the generated base class, whose NotImplementedError the interceptor answers
with UNIMPLEMENTED naming the RPC.
"""

from __future__ import annotations

from typing import Any

import grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.catalog import Item, Outcome, check_upsert, parse_category_prefix
from services.recommendation.store import RecommendationStore
from shared.auth import current_principal
from shared.errors import InvalidArgument, NotFound
from shared.page_tokens import PageTokens
from shared.proto_time import timestamp_of
from shared.validation import Violations, page_size_of

OUTCOMES = {
    Outcome.CREATED: pb.UPSERT_ITEM_OUTCOME_CREATED,
    Outcome.UPDATED: pb.UPSERT_ITEM_OUTCOME_UPDATED,
    Outcome.UNCHANGED: pb.UPSERT_ITEM_OUTCOME_UNCHANGED,
}


def item_of(message: pb.Item) -> Item:
    """The item as sent; create_time and update_time are output only and ignored."""
    return Item(
        item_id=message.item_id,
        title=message.title,
        category_path=tuple(message.category_path),
        brand=message.brand,
        price_micros=message.price_micros,
        currency_code=message.currency_code,
        tags=tuple(message.tags),
        available=message.available,
        attributes=dict(message.attributes),
    )


def item_message(item: Item) -> pb.Item:
    return pb.Item(
        item_id=item.item_id,
        title=item.title,
        category_path=item.category_path,
        brand=item.brand,
        price_micros=item.price_micros,
        currency_code=item.currency_code,
        tags=item.tags,
        available=item.available,
        attributes=item.attributes,
        create_time=timestamp_of(item.create_time_us),
        update_time=timestamp_of(item.update_time_us),
    )


SERVICE = pb.DESCRIPTOR.services_by_name["RecommendationService"]


class RecommendationServicer(pb_grpc.RecommendationServiceServicer):
    def __init__(self, store: RecommendationStore, max_response_bytes: int, tokens: PageTokens):
        self.store = store
        self.pages = tokens.of_service(SERVICE)
        # A page of 1000 items with every attribute filled would exceed the message limit:
        # a List page then holds fewer items (AIP-158 allows it) and the token goes on from there.
        self.max_response_bytes = max_response_bytes

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        batch = [item_of(message) for message in request.items]
        check_upsert(batch, violations)
        violations.raise_if_any()
        results = await self.store.upsert_items(str(current_principal()), request, batch)
        return pb.UpsertItemsResponse(
            results=[
                pb.UpsertItemResult(
                    item_id=r.item_id, outcome=OUTCOMES[r.outcome], update_time=timestamp_of(r.update_time_us)
                )
                for r in results
            ]
        )

    async def GetItem(self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("item_id", request.item_id)
        violations.raise_if_any()
        item = await self.store.get_item(request.item_id)
        if item is None:
            raise NotFound(
                f"item {request.item_id} does not exist",
                reason="ITEM_NOT_FOUND",
                metadata={"item_id": request.item_id},
            )
        return pb.GetItemResponse(item=item_message(item))

    async def ListItems(self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        try:
            size = page_size_of(request.page_size)
        except InvalidArgument as error:
            violations.found.extend(error.violations)
            size = 0
        prefix = parse_category_prefix("category_prefix", request.category_prefix, violations)
        violations.raise_if_any()
        filters = {"category_prefix": request.category_prefix, "available_only": request.available_only}
        position = self.pages.read("ListItems", request.page_token, filters, (str,))
        after = str(position[0]) if position else ""
        found, more = await self.store.list_items(after, size, prefix, request.available_only)
        page: list[pb.Item] = []
        used = 0
        for item in found:
            message = item_message(item)
            used += message.ByteSize() + 8  # the field's tag and length prefix, at most
            if page and used > self.max_response_bytes:
                more = True
                break
            page.append(message)
        token = ""
        if more:
            token = self.pages.issue("ListItems", filters, (page[-1].item_id,))
        return pb.ListItemsResponse(items=page, next_page_token=token)
