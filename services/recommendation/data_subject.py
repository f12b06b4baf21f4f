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

import json
from typing import Any

import grpc
from google.protobuf import struct_pb2
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from sqlalchemy.engine import Connection

from services.recommendation.store import RecommendationStore
from shared import idempotency
from shared.auth import current_principal
from shared.data_subject import check_request
from shared.db import now_micros
from shared.errors import InvalidArgument
from shared.proto_time import timestamp_of

SERVICE = "recommendation"
ERASE = "EraseCustomerData"
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


def erasure_response(customer_id: str, stored: bytes) -> privacy_pb.EraseCustomerDataResponse:
    """The response kept for an erasure's request id; refuses a request id reused for another customer."""
    first = json.loads(stored)
    if first["customer_id"] != customer_id:
        raise InvalidArgument(
            "request_id", "was already used to erase another customer", reason="REQUEST_ID_REUSED"
        )
    return privacy_pb.EraseCustomerDataResponse(
        service=SERVICE, erased_at=timestamp_of(first["erased_at_us"]), erased_records=first["erased_records"]
    )


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
            service=SERVICE, exported_at=timestamp_of(now_micros()), document=document
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        customer_id, request_id = request.customer_id, request.request_id
        principal = str(current_principal())

        def carry_out(connection: Connection) -> bytes:
            erased_at = now_micros()
            counts = erase_customer(connection, customer_id)
            return json.dumps(
                {"customer_id": customer_id, "erased_at_us": erased_at, "erased_records": counts}
            ).encode()

        def erase(connection: Connection) -> privacy_pb.EraseCustomerDataResponse:
            stored = idempotency.once(connection, principal, ERASE, request_id, carry_out)
            return erasure_response(customer_id, stored)

        return await self.store.db.write(erase)
