"""Server reflection that also resolves method names.

grpc-python's reflection servicer answers FileContainingSymbol from the descriptor pool,
whose look-up knows services, messages, enums, their values and fields, but not methods
(grpc/grpc issue 34743), so `grpcurl describe pkg.Service.Method` says "Symbol not
found". This servicer answers a method name with the file of its service, and anything
else as the library does.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

SERVICE_NAME = reflection.SERVICE_NAME


class MethodResolvingReflectionServicer(ReflectionServicer):
    """grpc_reflection's asyncio servicer, with `pkg.Service.Method` symbols resolved."""

    def _file_containing_symbol(self, request: Any, fully_qualified_name: str) -> Any:
        service_name, _, method_name = fully_qualified_name.rpartition(".")
        try:
            service = self._pool.FindServiceByName(service_name)
        except KeyError:
            service = None
        if service is not None and method_name in service.methods_by_name:
            return self._file_by_filename(request, service.file.name)
        return super()._file_containing_symbol(request, fully_qualified_name)


def enable_server_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Adds the reflection service (v1alpha, the one grpc-python ships) to `server`."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        MethodResolvingReflectionServicer(service_names), server
    )
