"""Registration of najimi.privacy.v1.DataSubjectService, which every service implements.

Only the consent service (carrying out data-subject requests) and admin may call it
(shared/access_policy.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2
from najimi.privacy.v1 import data_subject_service_pb2, data_subject_service_pb2_grpc
from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
from sqlalchemy.engine import Connection

from shared.auth import current_principal
from shared.db import Database, now_micros
from shared.idempotency import Idempotency, StoredReply
from shared.proto_time import timestamp_of
from shared.server import Registration
from shared.validation import Violations

# A Struct holds numbers as doubles: larger integers are exported as decimal strings.
MAX_EXACT_INTEGER = 2**53

DESCRIPTOR = data_subject_service_pb2.DESCRIPTOR.services_by_name["DataSubjectService"]


def data_subject_registration(servicer: Any) -> Registration:
    return Registration(
        DESCRIPTOR,
        data_subject_service_pb2_grpc.add_DataSubjectServiceServicer_to_server,
        servicer,
    )


def unimplemented_data_subject_registration() -> Registration:
    """Until a service implements export and erasure, both answer UNIMPLEMENTED."""
    return data_subject_registration(data_subject_service_pb2_grpc.DataSubjectServiceServicer())


def check_request(customer_id: str, request_id: str) -> None:
    """Both fields of an export or erasure request are required and well formed."""
    violations = Violations()
    violations.require_id("customer_id", customer_id)
    violations.require_request_id("request_id", request_id)
    violations.raise_if_any()


def json_safe(value: Any) -> Any:
    """`value` with every integer a double cannot hold exactly turned into a decimal string."""
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return value
    if isinstance(value, int):
        return value if abs(value) <= MAX_EXACT_INTEGER else str(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    return [json_safe(item) for item in value]


def struct_of(document: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(json_safe(document))
    return struct


def rfc3339(micros: int | None) -> str | None:
    stamp = timestamp_of(micros)
    return stamp.ToJsonString() if stamp is not None else None


def stored_response_document(stored: StoredReply, response_types: Mapping[str, Any]) -> dict[str, Any]:
    """A reply kept for retries (shared/idempotency.py) as an export shows it: its RPC,
    request id, caller and time, and the response as the proto's JSON where
    `response_types` (RPC name -> response message class) knows the RPC, else null."""
    message_type = response_types.get(stored.rpc)
    response: Any = None
    if message_type is not None:
        response = json_format.MessageToDict(message_type.FromString(stored.response))
    return {
        "rpc": stored.rpc,
        "request_id": stored.request_id,
        "caller": stored.principal,
        "stored_at": rfc3339(stored.created_at_us),
        "response": response,
    }


# What a service erases: (connection, customer_id, request_id, erased_at_us) -> count per kind.
Erasure = Callable[[Connection, str, str, int], dict[str, int]]


async def erase_once(
    database: Database,
    requests: Idempotency,
    service: str,
    request: privacy_pb.EraseCustomerDataRequest,
    erase: Erasure,
) -> privacy_pb.EraseCustomerDataResponse:
    """EraseCustomerData for any service: checked, carried out once per request id in one
    transaction with the stored replies about the customer, and answered with the first
    result on a retry. The erasure's own stored reply names no customer (its digest is a
    keyed hash), and SQLite's files are scrubbed once it has committed."""
    check_request(request.customer_id, request.request_id)
    customer_id, request_id = request.customer_id, request.request_id
    principal = str(current_principal())

    def carry_out(connection: Connection) -> bytes:
        erased_at = now_micros()
        counts = erase(connection, customer_id, request_id, erased_at)
        forgotten = requests.forget_customers(connection, [customer_id])
        if forgotten:
            counts["stored_responses"] = counts.get("stored_responses", 0) + forgotten
        return privacy_pb.EraseCustomerDataResponse(
            service=service, erase_time=timestamp_of(erased_at), erased_records=counts
        ).SerializeToString()

    stored = await database.write(
        lambda connection: requests.once(connection, principal, "EraseCustomerData", request, carry_out)
    )
    await database.scrub()
    return privacy_pb.EraseCustomerDataResponse.FromString(stored)
