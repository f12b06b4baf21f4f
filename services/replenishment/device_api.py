"""najimi.replenishment.device.v1.DeviceService over gRPC: the device API, each device for itself.

Thin: protobuf in, telemetry/ordering calls, protobuf out. The rules live in telemetry.py,
ordering.py and slot_forecasts.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

from services.replenishment.devices import check_own_device
from services.replenishment.store import ReplenishmentStore
from shared.auth import current_principal


class DeviceServicer(device_grpc.DeviceServiceServicer):
    """The device API; every RPC answers UNIMPLEMENTED until telemetry and ordering land.

    A device may act only for itself (access_policy), so each RPC checks the device_id it
    names first: a device naming another is PERMISSION_DENIED even before the RPC exists.
    """

    def __init__(self, store: ReplenishmentStore):
        self.store = store

    async def ReportTelemetry(
        self, request: device_pb.ReportTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_own_device(current_principal(), request.device_id)
        raise NotImplementedError

    async def StreamTelemetry(
        self,
        request_iterator: AsyncIterator[device_pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[device_pb.StreamTelemetryResponse]:
        async for request in request_iterator:
            check_own_device(current_principal(), request.device_id)  # the first message names it
            break
        raise NotImplementedError
        yield device_pb.StreamTelemetryResponse()  # unreachable: makes this an async generator

    async def GetForecast(
        self, request: device_pb.GetForecastRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_own_device(current_principal(), request.device_id)
        raise NotImplementedError

    async def Replenish(self, request: device_pb.ReplenishRequest, context: grpc.aio.ServicerContext) -> Any:
        check_own_device(current_principal(), request.device_id)
        raise NotImplementedError
