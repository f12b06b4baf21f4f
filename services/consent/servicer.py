"""ConsentService over gRPC: protobuf in, domain calls, protobuf out — nothing else."""

from __future__ import annotations

from typing import Any

import grpc
from najimi.consent.v1 import consent_service_pb2 as pb
from najimi.consent.v1 import consent_service_pb2_grpc as pb_grpc
from sqlalchemy.engine import Connection

from services.consent.store import ConsentStore, DataCategory, Purpose
from services.consent.vocabulary import check_labels, check_vocabulary_name
from shared.auth import ADMIN, SERVICES, AccessRule, current_principal
from shared.idempotency import once
from shared.proto_time import duration_of, timestamp_of
from shared.validation import Violations, decode_page_token, encode_page_token, page_size_of

# Who may call each RPC (see the proto's comments); anything absent is refused.
ACCESS: dict[str, AccessRule] = {
    "ListPurposes": SERVICES,
    "ListDataCategories": SERVICES,
    "CreatePurpose": ADMIN,
    "CreateDataCategory": ADMIN,
    "CreatePrivacyNotice": ADMIN,
    "GetPrivacyNotice": SERVICES,
    "ListPrivacyNotices": SERVICES,
    "GrantConsent": SERVICES,
    "WithdrawConsent": SERVICES,
    "SetConsents": SERVICES,
    "GetConsentState": SERVICES,
    "ListConsentHistory": SERVICES,
    "CheckConsent": SERVICES,
    "BatchCheckConsent": SERVICES,
    "GetConsentReceipt": SERVICES,
    "VerifyReceipt": SERVICES,
    "ListAuditEntries": ADMIN,
    "VerifyAuditLog": ADMIN,
    "ListConsentChanges": SERVICES,
    "WatchConsentChanges": SERVICES,
    "ExplainDataUse": SERVICES,
    "CreateDataSubjectRequest": SERVICES,
    "GetDataSubjectRequest": SERVICES,
    "ListDataSubjectRequests": SERVICES,
}


def data_category_message(category: DataCategory) -> pb.DataCategory:
    return pb.DataCategory(
        name=category.name,
        display_name=category.display_name,
        description=category.description,
        sensitive=category.sensitive,
        created_at=timestamp_of(category.created_at_us),
    )


def purpose_message(purpose: Purpose) -> pb.Purpose:
    return pb.Purpose(
        name=purpose.name,
        display_name=purpose.display_name,
        description=purpose.description,
        data_categories=purpose.data_categories,
        data_uses=[
            pb.ServiceDataUse(service=u.service, data_categories=u.data_categories, description=u.description)
            for u in purpose.data_uses
        ],
        consent_validity=duration_of(purpose.consent_validity_seconds),
        created_at=timestamp_of(purpose.created_at_us),
    )


def _page(request: Any) -> tuple[str, int]:
    size = page_size_of(request.page_size)
    after = decode_page_token(request.page_token).get("after", "")
    return str(after), size


def _next_token(names: list[str], size: int) -> str:
    return encode_page_token({"after": names[-1]}) if len(names) == size else ""


class ConsentServicer(pb_grpc.ConsentServiceServicer):
    def __init__(self, store: ConsentStore):
        self.store = store

    async def ListPurposes(self, request: pb.ListPurposesRequest, context: grpc.aio.ServicerContext) -> Any:
        after, size = _page(request)
        found = await self.store.list_purposes(after, size)
        return pb.ListPurposesResponse(
            purposes=[purpose_message(p) for p in found],
            next_page_token=_next_token([p.name for p in found], size),
        )

    async def ListDataCategories(
        self, request: pb.ListDataCategoriesRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        after, size = _page(request)
        found = await self.store.list_data_categories(after, size)
        return pb.ListDataCategoriesResponse(
            data_categories=[data_category_message(c) for c in found],
            next_page_token=_next_token([c.name for c in found], size),
        )

    async def CreateDataCategory(
        self, request: pb.CreateDataCategoryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        category = request.data_category
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        check_vocabulary_name(violations, "data_category.name", category.name)
        check_labels(violations, "data_category", category.display_name, category.description)
        violations.raise_if_any()

        def create(connection: Connection) -> bytes:
            stored = self.store.insert_data_category(
                connection, category.name, category.display_name, category.description, category.sensitive
            )
            return pb.CreateDataCategoryResponse(
                data_category=data_category_message(stored)
            ).SerializeToString()

        principal = str(current_principal())
        response = await self.store.db.write(
            lambda connection: once(connection, principal, "CreateDataCategory", request.request_id, create)
        )
        return pb.CreateDataCategoryResponse.FromString(response)
