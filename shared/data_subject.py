"""Registration of najimi.privacy.v1.DataSubjectService, which every service implements.

Only the consent service (carrying out data-subject requests) and admin may call it.
"""

from __future__ import annotations

from typing import Any

from najimi.privacy.v1 import data_subject_service_pb2, data_subject_service_pb2_grpc

from shared.auth import allow
from shared.server import Registration

DATA_SUBJECT_ACCESS = {
    "ExportCustomerData": allow("service:consent"),
    "EraseCustomerData": allow("service:consent"),
}
DESCRIPTOR = data_subject_service_pb2.DESCRIPTOR.services_by_name["DataSubjectService"]


def data_subject_registration(servicer: Any) -> Registration:
    return Registration(
        DESCRIPTOR,
        data_subject_service_pb2_grpc.add_DataSubjectServiceServicer_to_server,
        servicer,
        DATA_SUBJECT_ACCESS,
    )


def unimplemented_data_subject_registration() -> Registration:
    """Until a service implements export and erasure, both answer UNIMPLEMENTED."""
    return data_subject_registration(data_subject_service_pb2_grpc.DataSubjectServiceServicer())
