"""najimi.privacy.v1.DataSubjectService of the recommendation service: a customer's export and erasure.

The service holds no per-customer rows yet: its tables are the item catalog and the
request ids of catalog writes. So an export is truthfully empty,

    {"customer_id": ..., "held": {}, "not_held_yet": {...}},

and an erasure erases nothing (erased_records is empty), remembering its first result
for retries like every service does.

When models are trained, their artefacts hold for each customer only a latent vector
derived from consented data (interactions and attributes the customer agreed to); the
issues that add training and serving also extend this export and erasure to cover it.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from sqlalchemy.engine import Connection

from services.recommendation.store import RecommendationStore
from shared.data_subject import check_request, erase_once
from shared.db import now_micros
from shared.proto_time import timestamp_of

SERVICE = "recommendation"
NOT_HELD_YET = {
    "interactions": "customer interactions are not copied from profile by this version",
    "model": "no model is trained yet; a trained one holds only a latent vector derived from consented data",
}


def export_document(customer_id: str) -> dict[str, Any]:
    # Nothing per customer is stored yet (see the module docstring).
    return {"customer_id": customer_id, "held": {}, "not_held_yet": NOT_HELD_YET}


def erase_customer(connection: Connection, customer_id: str) -> dict[str, int]:
    """Deletes what is held about the customer: nothing yet, so no kind has a count."""
    return {}


class RecommendationDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, store: RecommendationStore):
        self.store = store

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        document = struct_pb2.Struct()
        document.update(export_document(request.customer_id))
        return privacy_pb.ExportCustomerDataResponse(
            service=SERVICE, export_time=timestamp_of(now_micros()), document=document
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        return await erase_once(
            self.store.db,
            self.store.idempotency,
            SERVICE,
            request,
            lambda connection, customer_id, *_: erase_customer(connection, customer_id),
        )
