"""Domain errors and their mapping to canonical gRPC status codes (AIP-193).

Domain code raises these; the error-mapping interceptor turns them into a
`google.rpc.Status` with an `ErrorInfo` (an UPPER_SNAKE reason a caller can switch
on) and, for invalid input, a `BadRequest` naming each offending field.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "najimi.dev"  # set to "<service>.najimi" by the server at start-up
# Details travel in trailing metadata, which clients cap at 8 KiB by default; the
# message repeats the list, so keep both well under half of that.
MAX_LISTED_VIOLATION_BYTES = 1500


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class DomainError(Exception):
    """Base of every error a caller may cause or see; never an INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = metadata or {}

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(
            error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        )
        return [info]


class InvalidArgument(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, field_name: str, description: str, *, reason: str | None = None):
        super().__init__(f"{field_name}: {description}", reason=reason)
        self.violations = [FieldViolation(field_name, description)]

    @classmethod
    def of(cls, violations: list[FieldViolation]) -> InvalidArgument:
        """One error for many violations, listing as many as fit in gRPC's metadata limits."""
        listed, size = [], 0
        for violation in violations:
            size += len(violation.field) + len(violation.description) + 8
            if size > MAX_LISTED_VIOLATION_BYTES:
                break
            listed.append(violation)
        if len(listed) < len(violations):
            # Reported under the top-level field of the first violation left out, e.g. "items".
            top = violations[len(listed)].field.split("[")[0].split(".")[0]
            left = len(violations) - len(listed)
            listed.append(
                FieldViolation(top, f"{left} more violations are not listed; fix these and send again")
            )
        error = cls(violations[0].field, violations[0].description)
        error.violations = listed
        error.message = "; ".join(f"{v.field}: {v.description}" for v in listed)
        error.args = (error.message,)
        return error

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(DomainError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, reason: str | None = None, retry_after: float | None = None):
        super().__init__(message, reason=reason)
        self.retry_after = retry_after  # seconds; sent as a google.rpc.RetryInfo when set

    def details(self) -> list[any_pb2.Any]:
        if self.retry_after is None:
            return super().details()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1, round(self.retry_after * 1e9)))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [*super().details(), packed]


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class Unimplemented(DomainError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "NOT_IMPLEMENTED"


def status_of(error: DomainError) -> grpc.Status:
    """The rich gRPC status (code, message, google.rpc.Status details) for `error`."""
    proto = status_pb2.Status(
        code=getattr(code_pb2, error.code.name), message=error.message, details=error.details()
    )
    return rpc_status.to_status(proto)


def internal_status(request_id: str) -> grpc.Status:
    """What a caller sees for an unexpected failure: no stack trace, a request id to quote."""
    info = any_pb2.Any()
    info.Pack(
        error_details_pb2.ErrorInfo(
            reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id}
        )
    )
    proto = status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error (request id {request_id})", details=[info]
    )
    return rpc_status.to_status(proto)


def error_reason(error: grpc.Call) -> str:
    """The ErrorInfo reason a call failed with ("" without one): the caller's side of the above."""
    status = rpc_status.from_call(error)
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""
