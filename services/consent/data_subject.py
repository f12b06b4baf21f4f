"""najimi.privacy.v1.DataSubjectService of the consent service: its own part of an export or erasure."""

from __future__ import annotations

from typing import Any

import grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from sqlalchemy.engine import Connection

from services.consent.customer_data import erase_customer, export_customer
from services.consent.feed import ChangeFeed
from shared.auth import current_principal
from shared.data_subject import check_request, struct_of
from shared.db import Database, now_micros
from shared.idempotency import once
from shared.proto_time import timestamp_of


class ConsentDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, database: Database, feed: ChangeFeed, ref_key: bytes):
        self.db = database
        self.feed = feed
        self.ref_key = ref_key

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        now = now_micros()
        document = await self.db.read(lambda c: export_customer(c, request.customer_id, self.ref_key))
        return privacy_pb.ExportCustomerDataResponse(
            service="consent", exported_at=timestamp_of(now), document=struct_of(document)
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        now = now_micros()
        principal = str(current_principal())

        def erase(connection: Connection) -> bytes:
            erased = erase_customer(connection, request.customer_id, self.ref_key, request.request_id, now)
            return privacy_pb.EraseCustomerDataResponse(
                service="consent", erased_at=timestamp_of(now), erased_records=erased
            ).SerializeToString()

        stored = await self.db.write(
            lambda c: once(c, principal, "EraseCustomerData", request.request_id, erase)
        )
        await self.feed.refresh()
        return privacy_pb.EraseCustomerDataResponse.FromString(stored)
