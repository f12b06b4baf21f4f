"""najimi.privacy.v1.DataSubjectService of the consent service: its own part of an export or erasure."""

from __future__ import annotations

from typing import Any

import grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from sqlalchemy.engine import Connection

from services.consent.customer_data import export_customer
from services.consent.feed import ChangeFeed
from services.consent.subject_requests import erase_consent_part
from shared.data_subject import check_request, erase_once, struct_of
from shared.db import Database, now_micros
from shared.idempotency import Idempotency
from shared.proto_time import timestamp_of


class ConsentDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, database: Database, feed: ChangeFeed, ref_key: bytes, idempotency: Idempotency):
        self.db = database
        self.idempotency = idempotency
        self.feed = feed
        self.ref_key = ref_key

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        now = now_micros()
        document = await self.db.read(lambda c: export_customer(c, request.customer_id, self.ref_key))
        return privacy_pb.ExportCustomerDataResponse(
            service="consent", export_time=timestamp_of(now), document=struct_of(document)
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        def erase(
            connection: Connection, customer_id: str, request_id: str, erased_at: int
        ) -> dict[str, int]:
            return erase_consent_part(
                connection, customer_id, self.ref_key, request_id, erased_at, self.idempotency
            )

        response = await erase_once(self.db, self.idempotency, "consent", request, erase)
        await self.feed.refresh()  # the ERASURE change: this replica's checks forget the customer now
        return response
