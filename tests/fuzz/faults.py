"""What the fuzz tests accept as an answer, and how they report one they do not.

An answer is acceptable when its code is documented: OK or the code of one of the
domain errors in shared/errors.py (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED,
UNAVAILABLE, UNIMPLEMENTED, ...). INTERNAL and UNKNOWN never are, nor is
DEADLINE_EXCEEDED, except on a watch, which the test itself cuts off. A caller with no
token or a bad one gets UNAUTHENTICATED, whatever it sends.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.message import DecodeError, Message

from shared import errors
from tests.fuzz.rpcs import Rpc
from tests.fuzz.suite import Outcome


def _domain_codes(base: type[errors.DomainError]) -> set[grpc.StatusCode]:
    found = set()
    for error in base.__subclasses__():
        found |= {error.code, *_domain_codes(error)}
    return found


DOCUMENTED = frozenset({grpc.StatusCode.OK, *_domain_codes(errors.DomainError)})
# A watch is ended by the test: by its deadline, or by a cancel once it has read enough.
DOCUMENTED_ON_A_WATCH = DOCUMENTED | {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# A caller without a valid token learns nothing else, whatever it sends (authentication
# comes first); only a message over the size limit is refused before that, by gRPC itself.
ANSWERS_WITHOUT_A_VALID_TOKEN = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.RESOURCE_EXHAUSTED}
)
TOKEN_FIELDS = ("page_token", "cursor")
HEX_SHOWN = 2_048  # bytes of a body shown in hex; a longer body is also written to a file


@dataclass
class Fault:
    """One call that got an undocumented answer, with all it takes to send it again."""

    rpc: Rpc
    principal: str
    outcome: Outcome
    bodies: list[bytes]
    request_id: str
    server_error: str | None

    def decodes(self) -> bool:
        """Whether every body decodes as the RPC's request message."""
        request_class = message_factory.GetMessageClass(self.rpc.input_type)
        try:
            for body in self.bodies:
                request_class.FromString(body)
        except (DecodeError, RuntimeError, RecursionError):
            return False
        return True

    def server_error_is(self, *names: str) -> bool:
        """Whether the server-side exception is one of these classes."""
        return self.server_error is not None and self.server_error.split(":", 1)[0] in names

    def values(self) -> Iterator[tuple[str, Any]]:
        """(field name, value) of every field set anywhere in the bodies that decode."""
        request_class = message_factory.GetMessageClass(self.rpc.input_type)
        for body in self.bodies:
            try:
                message = request_class.FromString(body)
            except (DecodeError, RuntimeError, RecursionError):
                continue
            yield from _set_values(message)

    def report(self) -> str:
        lines = [
            "an undocumented answer:",
            f"  rpc        {self.rpc} ({self.rpc.path}, {self.rpc.kind})",
            f"  principal  {self.principal}",
            f"  code       {self.outcome.code.name}",
            f"  message    {self.outcome.details!r}",
            f"  server     {self.server_error or '(no server-side exception logged)'}",
            f"  request id {self.request_id}",
        ]
        for index, body in enumerate(self.bodies):
            shown = body[:HEX_SHOWN].hex()
            lines.append(
                f"  body[{index}]    {len(body)} bytes, hex {shown}{'...' if len(body) > HEX_SHOWN else ''}"
            )
            if len(body) > HEX_SHOWN:
                lines.append(f"             all of it: {_saved(body)}")
        return "\n".join(lines)


def _set_values(message: Message) -> Iterator[tuple[str, Any]]:
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            items = list(value.values())
        else:
            items = list(value) if descriptor.is_repeated else [value]
        for item in items:
            yield descriptor.name, item
            if isinstance(item, Message):
                yield from _set_values(item)


def _invalid_time(value: Any) -> bool:
    """Whether `value` is a Timestamp or Duration outside protobuf's valid range."""
    if isinstance(value, timestamp_pb2.Timestamp | duration_pb2.Duration):
        try:
            value.ToJsonString()
        except ValueError:
            return True
    return False


def _saved(body: bytes) -> Path:
    path = Path(tempfile.gettempdir()) / f"najimi-fuzz-{hashlib.sha256(body).hexdigest()[:16]}.bin"
    path.write_bytes(body)
    return path
