"""najimi.privacy.v1.DataSubjectService of the recommendation service: a customer's export and erasure.

Per customer, the service holds its local consented copy of their interactions
(interactions.py). An export lists them,

    {"customer_id": ..., "held": {"interactions": [...]}, "not_held_yet": {...}},

and an erasure deletes them (erased_records {"interactions": n}), remembering its first
result for retries like every service does. Training reads the copy, so an erased
customer is left out of every later training at once.

Trained models' artefacts will hold for each customer only a latent vector derived from
consented data; the issue that adds serving extends this export and erasure to cover it.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from sqlalchemy.engine import Connection

from services.recommendation.interactions import (
    InteractionCopy,
    customer_interactions,
    erase_customer_interactions,
)
from services.recommendation.store import RecommendationStore
from shared.data_subject import check_request, erase_once
from shared.db import now_micros
from shared.proto_time import timestamp_of

SERVICE = "recommendation"
NOT_HELD_YET = {
    "model": "no model is trained yet; a trained one holds only a latent vector derived from consented data",
}


def export_document(connection: Connection, customer_id: str) -> dict[str, Any]:
    held = [
        {
            "item_id": entry.item_id,
            "interaction_type": profile_pb.InteractionType.Name(entry.interaction_type),
            "weight": entry.weight,
            "occur_time": _rfc3339(entry.occur_time_us),
            "event_id": entry.event_id,
            "channel": profile_pb.Channel.Name(entry.channel),
            "data_category": entry.data_category,
        }
        for entry in customer_interactions(connection, customer_id)
    ]
    return {
        "customer_id": customer_id,
        "held": {"interactions": held} if held else {},
        "not_held_yet": NOT_HELD_YET,
    }


def _rfc3339(micros: int) -> str:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp.ToJsonString()


def erase_customer(connection: Connection, customer_id: str) -> dict[str, int]:
    """Deletes what is held about the customer: their entries of the interaction copy."""
    erased = erase_customer_interactions(connection, customer_id)
    return {"interactions": erased} if erased else {}


class RecommendationDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, store: RecommendationStore, copy: InteractionCopy):
        self.store = store
        self.copy = copy

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        document = struct_pb2.Struct()
        document.update(await self.store.db.read(lambda c: export_document(c, request.customer_id)))
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
