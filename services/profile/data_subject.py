"""najimi.privacy.v1.DataSubjectService of the profile service: a customer's export and erasure.

Export is for the data subject, so PII is decrypted (the caller is the consent service
or admin, carrying out the subject's request). The document (a google.protobuf.Struct)
has one shape whether or not the customer is known:

    {"customer_id": ..., "held": {"customer": {...} | null, "identities": [...],
     "stored_responses": [...], "events": [...], "traits": {...} | null, "erasure": {...} | null},
     "not_held_yet": {...}}

Events are exported as stored (the proto's JSON of each Event, search queries included:
they are the subject's data), and traits as computed at export time from all that is
held (the proto's JSON of Traits), whatever the customer consents to today.

An export is a read: a retry with the same request_id reads the data again instead of
keeping a second copy of everything (the proto's "same document" holds while the data is
unchanged; export_time says when it was taken).

Erasure deletes the customer, its identities, its events, its trait aggregates and the
stored responses of requests about it (a retry of CreateCustomer must not bring them
back) in one transaction, and keeps an erasure tombstone (table `erasures`, a keyed hash
of the id, not the id): the id then reads as CUSTOMER_ERASED and cannot be created again. An id never seen is tombstoned too, since it names the data subject. The
erasure is idempotent by request_id: a retry returns the first result.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import json_format
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc
from najimi.profile.v1 import profile_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.profile import trait_store, traits
from services.profile.customers import Attribute, Customer
from services.profile.identity import Identity
from services.profile.servicer import GENDER_VALUES, IDENTIFIER_TYPES
from services.profile.store import HeldData, ProfileStore
from services.profile.trait_rpcs import traits_message
from shared.data_subject import (
    check_request,
    erase_once,
    rfc3339,
    stored_response_document,
    struct_of,
)
from shared.db import now_micros
from shared.proto_time import timestamp_of

SERVICE = "profile"
# Stored responses by RPC, for the export to show them as JSON.
STORED_RESPONSE_TYPES: dict[str, Any] = {
    "CreateCustomer": pb.CreateCustomerResponse,
    "LinkIdentity": pb.LinkIdentityResponse,
    "MergeCustomers": pb.MergeCustomersResponse,
}
NOT_HELD_YET: dict[str, str] = {}


def attribute_document(attribute: Attribute) -> dict[str, Any]:
    value: Any = attribute.value
    if attribute.kind == "timestamp":
        value = rfc3339(int(value))
    return {"kind": attribute.kind, "value": value, "data_category": attribute.data_category}


def customer_document(customer: Customer) -> dict[str, Any]:
    profile = customer.profile
    return {
        "customer_id": customer.customer_id,
        "display_name": profile.display_name,
        "email": profile.email,
        "phone": profile.phone,
        "birth_year": profile.birth_year,
        "gender": pb.Gender.Name(GENDER_VALUES.get(profile.gender, pb.GENDER_UNSPECIFIED)),
        "region": profile.region,
        "language_code": profile.language_code,
        "signup_time": rfc3339(profile.signup_time_us),
        "attributes": {key: attribute_document(a) for key, a in sorted(profile.attributes.items())},
        "create_time": rfc3339(customer.create_time_us),
        "update_time": rfc3339(customer.update_time_us),
        "revision": customer.revision,
    }


def identity_document(identity: Identity) -> dict[str, Any]:
    identifier = identity.identifier
    return {
        "identity_id": identity.identity_id,
        "type": pb.IdentifierType.Name(IDENTIFIER_TYPES[identifier.kind]),
        "issuer": identifier.issuer,
        "value": identifier.value,
        "verified": identity.verified,
        "link_time": rfc3339(identity.link_time_us),
        "linked_by": identity.linked_by,
    }


def event_document(payload: bytes) -> dict[str, Any]:
    """One stored event as the proto's JSON (field names as in the proto, 64-bit integers as
    strings), with what the service added: resolved_customer_id, data_category, receive_time."""
    return json_format.MessageToDict(pb.Event.FromString(payload), preserving_proto_field_name=True)


def traits_document(
    customer_id: str, aggregates: traits.CustomerAggregates, now_us: int
) -> dict[str, Any] | None:
    """The traits computed from everything held of the customer (the subject sees what can
    be derived from their data, whatever they consent to today), as the proto's JSON; None
    when nothing is held."""
    if not (aggregates.orders or aggregates.item_purchases or aggregates.affinities):
        return None
    computed = traits.compute_traits(customer_id, aggregates, now_us, traits.TRAIT_INPUTS)
    return json_format.MessageToDict(traits_message(computed), preserving_proto_field_name=True)


def export_document(
    customer_id: str, held: HeldData, held_traits: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "customer_id": customer_id,
        "held": {
            "customer": customer_document(held.customer) if held.customer is not None else None,
            "identities": [identity_document(identity) for identity in held.identities],
            "stored_responses": [
                stored_response_document(s, STORED_RESPONSE_TYPES) for s in held.stored_responses
            ],
            # In commit order; events moved here from customers merged into this one included.
            "events": [event_document(payload) for payload in held.events],
            "traits": held_traits,
            "erasure": (
                {"erase_time": rfc3339(held.erased_at_us), "request_id": held.erasure_request_id}
                if held.erased_at_us is not None
                else None
            ),
        },
        "not_held_yet": NOT_HELD_YET,
    }


class ProfileDataSubjectServicer(privacy_grpc.DataSubjectServiceServicer):
    def __init__(self, store: ProfileStore):
        self.store = store

    async def ExportCustomerData(
        self, request: privacy_pb.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_request(request.customer_id, request.request_id)
        exported_at = now_micros()

        def read(connection: Connection) -> tuple[HeldData, traits.CustomerAggregates]:
            return (
                self.store.held_data(connection, request.customer_id),
                trait_store.load_aggregates(connection, request.customer_id),
            )

        held, aggregates = await self.store.db.read(read)
        held_traits = traits_document(request.customer_id, aggregates, exported_at)
        return privacy_pb.ExportCustomerDataResponse(
            service=SERVICE,
            export_time=timestamp_of(exported_at),
            document=struct_of(export_document(request.customer_id, held, held_traits)),
        )

    async def EraseCustomerData(
        self, request: privacy_pb.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        def erase(
            connection: Connection, customer_id: str, request_id: str, erased_at: int
        ) -> dict[str, int]:
            counts = self.store.erase(connection, customer_id, request_id, erased_at)
            # The trait aggregates computed from the customer's events (aliases have none:
            # a merge drops them, see trait_store.rebuild).
            counts["traits"] = trait_store.erase_traits(connection, customer_id)
            return counts

        try:
            return await erase_once(self.store.db, self.store.idempotency, SERVICE, request, erase)
        finally:
            # The erased ids include aliases, and the merges that named them are gone, which
            # changes other customers' merged_from: rare enough to drop every cached answer.
            self.store.customer_cache.clear()
