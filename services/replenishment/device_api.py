"""najimi.replenishment.device.v1.DeviceService over gRPC: the device API, each device for itself.

Thin: protobuf in, telemetry.py / ordering.py calls, protobuf out. Every RPC first checks
that the device named is the caller's own (devices.check_own_device): a device naming
another is PERMISSION_DENIED before anything else.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb

from services.replenishment import telemetry
from services.replenishment.devices import check_own_device
from services.replenishment.ordering import Ordering, SlotDecision
from services.replenishment.slot_forecasts import current_forecast, load_slot
from services.replenishment.store import ReplenishmentStore, load_device
from shared.auth import Principal, current_principal
from shared.db import now_micros
from shared.errors import InvalidArgument, ResourceExhausted, Unavailable
from shared.proto_time import timestamp_micros, timestamp_of
from shared.validation import REQUEST_ID, Violations

STATUSES = {
    "ACCEPTED": device_pb.READING_STATUS_ACCEPTED,
    "DUPLICATE": device_pb.READING_STATUS_DUPLICATE,
    "REJECTED": device_pb.READING_STATUS_REJECTED,
}
MIN_BURST = float(telemetry.MAX_READINGS)  # a full batch always fits an idle device's bucket
BURST_SECONDS = 10.0


def _checked_device_id(device_id: str) -> str:
    violations = Violations()
    violations.require_id("device_id", device_id, REQUEST_ID)
    violations.raise_if_any()
    return device_id


def _readings_of(messages: Sequence[device_pb.Reading]) -> list[telemetry.Reading]:
    if not messages or len(messages) > telemetry.MAX_READINGS:
        raise InvalidArgument("readings", f"must hold 1 to {telemetry.MAX_READINGS} readings")
    batch = []
    for message in messages:
        has_time = message.HasField("measure_time")
        batch.append(
            telemetry.Reading(
                message.reading_id,
                message.slot_id,
                message.level,
                timestamp_micros(message.measure_time) if has_time else None,
                has_time,
            )
        )
    return batch


def slot_outcome(decision: SlotDecision, level: float | None) -> device_pb.SlotOutcome:
    """A decision as the device package shows it (the ReplenishOutcome numbers are the same)."""
    return device_pb.SlotOutcome(
        slot_id=decision.slot_id,
        outcome=decision.outcome,  # type: ignore[arg-type]
        order_id=decision.order_id,
        expected_delivery_time=timestamp_of(getattr(decision, "expected_delivery_time_us", None)),
        retry_time=timestamp_of(getattr(decision, "retry_time_us", None)),
        message=decision.reason[:200],
        level=level or 0.0,
    )


def device_forecast(found: pb.SlotForecast) -> device_pb.Forecast:
    """GetSlotForecast's SlotForecast in the device package's terms (same numbers)."""
    message = device_pb.Forecast(
        slot_id=found.slot_id,
        status=found.status,  # type: ignore[arg-type]
        method=found.method,  # type: ignore[arg-type]
        unit=found.unit,
        current_level=found.current_level,
        lead_time=found.lead_time,
        safety_stock=found.safety_stock,
        reorder_point=found.reorder_point,
        expected_order_time=found.reorder_time if found.HasField("reorder_time") else None,
        expected_replenishment_time=(
            found.expected_replenishment_time if found.HasField("expected_replenishment_time") else None
        ),
        confidence=found.confidence,
        explanation=found.explanation,
    )
    if found.HasField("consumption_rate_per_day"):
        message.consumption_rate_per_day = found.consumption_rate_per_day
    if found.HasField("days_to_empty"):
        message.days_to_empty = found.days_to_empty
    return message


class DeviceServicer(device_grpc.DeviceServiceServicer):
    def __init__(self, store: ReplenishmentStore, ordering: Ordering, readings_per_second: float):
        self.store = store
        self.ordering = ordering
        self.limiter = telemetry.RateLimiter(
            readings_per_second, max(MIN_BURST, BURST_SECONDS * readings_per_second)
        )

    def _decide(self, connection: Any, device_id: str, slot_id: str) -> SlotDecision:
        """The decision after telemetry, in the batch's transaction. A consent state too stale
        to act on never fails the report: the outcome is CONSENT_REQUIRED for now."""
        try:
            return self.ordering.decide(connection, device_id, slot_id, trigger=pb.ORDER_TRIGGER_AUTOMATIC)
        except Unavailable as error:  # raised before the decision writes anything
            return SlotDecision(
                device_id, slot_id, pb.REPLENISH_OUTCOME_CONSENT_REQUIRED, reason=error.message
            )

    async def _report(
        self, principal: Principal, device_id: str, batch: list[telemetry.Reading]
    ) -> tuple[list[device_pb.ReadingResult], list[device_pb.SlotOutcome]]:
        now = now_micros()
        by_device = principal.kind == "device"

        def work(connection: Any) -> tuple[telemetry.Batch, list[SlotDecision]]:
            # One unit: the readings and the decisions they lead to commit together, or not at
            # all. Concurrent reports share a transaction (Database.write_joined, a savepoint
            # each): a report is answered, and its readings ACCEPTED, once that has committed.
            stored = telemetry.record(connection, device_id, batch, now, by_device, self.ordering.series)
            return stored, [self._decide(connection, device_id, slot_id) for slot_id in stored.levels]

        stored, decisions = await self.store.db.write_joined(work)
        for decision in decisions:
            await self.ordering.placed(decision)
        results = [
            device_pb.ReadingResult(
                reading_id=r.reading_id,
                status=STATUSES[r.status],  # type: ignore[arg-type]
                field=r.field,
                reason=r.reason,
                description=r.description,
                refill_detected=r.refill,
            )
            for r in stored.results
        ]
        return results, [slot_outcome(d, stored.levels[d.slot_id]) for d in decisions]

    async def ReportTelemetry(
        self, request: device_pb.ReportTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        principal = current_principal()
        check_own_device(principal, request.device_id)
        device_id = _checked_device_id(request.device_id)
        batch = _readings_of(request.readings)
        self.limiter.take(device_id, len(batch), refuse=False)  # counts toward the streams' limit
        results, outcomes = await self._report(principal, device_id, batch)
        return device_pb.ReportTelemetryResponse(results=results, slot_outcomes=outcomes)

    async def StreamTelemetry(
        self,
        request_iterator: AsyncIterator[device_pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[device_pb.StreamTelemetryResponse]:
        principal = current_principal()
        device_id = ""
        async for request in request_iterator:
            if not device_id:
                check_own_device(principal, request.device_id)  # the first message names it
                device_id = _checked_device_id(request.device_id)
            elif request.device_id and request.device_id != device_id:
                raise InvalidArgument("device_id", "must be empty or the first message's device_id")
            batch = _readings_of(request.readings)
            wait = self.limiter.take(device_id, len(batch))
            if wait:
                raise ResourceExhausted(
                    f"device {device_id} sends more than {self.limiter.rate:g} readings a second",
                    reason="TELEMETRY_RATE_EXCEEDED",
                    retry_after=wait,
                )
            results, outcomes = await self._report(principal, device_id, batch)
            yield device_pb.StreamTelemetryResponse(results=results, slot_outcomes=outcomes)

    async def GetForecast(
        self, request: device_pb.GetForecastRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        check_own_device(current_principal(), request.device_id)
        violations = Violations()
        violations.require_id("device_id", request.device_id, REQUEST_ID)
        violations.require_id("slot_id", request.slot_id, REQUEST_ID)
        violations.raise_if_any()
        now = self.ordering.clock()

        def read(connection: Any) -> pb.SlotForecast:
            load_device(connection, request.device_id)  # DEVICE_NOT_FOUND before SLOT_NOT_FOUND
            return current_forecast(connection, request.device_id, request.slot_id, now)

        return device_pb.GetForecastResponse(forecast=device_forecast(await self.store.db.read(read)))

    async def Replenish(self, request: device_pb.ReplenishRequest, context: grpc.aio.ServicerContext) -> Any:
        principal = current_principal()
        check_own_device(principal, request.device_id)
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        violations.require_id("device_id", request.device_id, REQUEST_ID)
        violations.require_id("slot_id", request.slot_id, REQUEST_ID)
        violations.raise_if_any()

        def reply(connection: Any, decision: SlotDecision) -> device_pb.ReplenishResponse:
            level = load_slot(connection, request.device_id, request.slot_id).level
            return device_pb.ReplenishResponse(outcome=slot_outcome(decision, level))

        # The decision, its order and the stored reply commit together (one answer per request_id).
        stored = await self.ordering.decide_once(
            self.store.idempotency,
            str(principal),
            "Replenish",
            request,
            reply,
            trigger=pb.ORDER_TRIGGER_DEVICE_REQUEST,
        )
        return device_pb.ReplenishResponse.FromString(stored)
