"""najimi.privacy.v1.DataSubjectService of the recommendation service: a customer's export and erasure.

Per customer, the service holds its local consented copy of their interactions
(interactions.py). An export lists them,

    {"customer_id": ..., "held": {"interactions": [...]}, "not_held_yet": {...}},

and an erasure deletes them (erased_records {"interactions": n}), remembering its first
result for retries like every service does. Training reads the copy, so an erased
customer is left out of every later training at once.

A trained model holds for each customer it learned only a latent vector (their row)
derived from consented data. An erasure masks that row in the active model
(active_model.py's overlay, recorded in serving_erasures for every replica) and drops
the customer from serving's caches (their history and attributes) at once: from the next
request they are a cold start; the next training leaves them out. An export says whether
the active model holds such a row.

The stored artefacts are not rewritten: every version trained before the erasure keeps
the customer's id in its maps.json (customer_ids, "customer:<id>" feature names) and their
customer rows, until its directory is deleted. Each artefact is immutable and verified
against the checksum the registry holds while any replica on the shared model volume may
be loading it, and several replicas may erase at once: a rewrite would have to change the
recorded checksum and serialise its writers (README "Serving recommendations", Erasure).
The overlay masks the row in every version, rollbacks included.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import struct_pb2, timestamp_pb2
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from sqlalchemy.engine import Connection

from services.recommendation.active_model import ActiveModel, record_erasure
from services.recommendation.customer_attributes import CustomerAttributeCache
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
MODEL_ROW = (
    "model {version} holds a latent vector (its row) derived from this customer's consented data; "
    "it is masked on erasure and absent from the next model"
)


def export_document(connection: Connection, customer_id: str, model_row: str = "") -> dict[str, Any]:
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
    document: dict[str, Any] = {"customer_id": customer_id, "held": {"interactions": held} if held else {}}
    if model_row:
        document["held"]["model"] = model_row
    else:
        document["not_held_yet"] = NOT_HELD_YET
    return document


def _rfc3339(micros: int) -> str:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp.ToJsonString()


def erase_customer(
    connection: Connection, customer_id: str, customer_ref: str, time_us: int
) -> dict[str, int]:
    """Deletes what is held about the customer (their entries of the interaction copy) and
    records the erasure (by `customer_ref`), which masks their row in the models trained
    before it."""
    erased = erase_customer_interactions(connection, customer_id)
    record_erasure(connection, customer_ref, time_us)
    return {"interactions": erased} if erased else {}


class RecommendationDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(
        self,
        store: RecommendationStore,
        copy: InteractionCopy,
        active_model: ActiveModel,
        attributes: CustomerAttributeCache,
    ):
        self.store = store
        self.copy = copy
        self.active_model = active_model
        self.attributes = attributes

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        document = struct_pb2.Struct()
        model = self.active_model.current()
        model_row = (
            MODEL_ROW.format(version=model.version)
            if model is not None
            and request.customer_id in model.serving.customer_rows
            and not self.active_model.is_erased(model, request.customer_id)
            else ""
        )
        document.update(
            await self.store.db.read(lambda c: export_document(c, request.customer_id, model_row))
        )
        return privacy_pb.ExportCustomerDataResponse(
            service=SERVICE, export_time=timestamp_of(now_micros()), document=document
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        customer_ref = self.active_model.customer_ref(request.customer_id)
        response = await erase_once(
            self.store.db,
            self.store.idempotency,
            SERVICE,
            request,
            lambda connection, customer_id, _, erased_at: erase_customer(
                connection, customer_id, customer_ref, erased_at
            ),
        )
        # Every cache at once: the next request serves them as a cold start.
        self.active_model.erased(customer_ref, response.erase_time.ToMicroseconds())
        self.copy.changed([request.customer_id])
        self.attributes.forget([request.customer_id])
        return response
