"""najimi.replenishment.device.v1.DeviceService over gRPC: the device API, each device for itself.

Thin: protobuf in, telemetry.py / ordering.py calls, protobuf out. Every RPC first checks
that the device named is the caller's own (devices.check_own_device): a device naming
another is PERMISSION_DENIED before anything else.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

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
from shared.errors import DomainError, InvalidArgument, ResourceExhausted, Unavailable
from shared.proto_time import timestamp_micros, timestamp_of
from shared.request_groups import arrived_together
from shared.validation import REQUEST_ID, Violations

STATUSES = {
    "ACCEPTED": device_pb.READING_STATUS_ACCEPTED,
    "DUPLICATE": device_pb.READING_STATUS_DUPLICATE,
    "REJECTED": device_pb.READING_STATUS_REJECTED,
}
MIN_BURST = float(telemetry.MAX_READINGS)  # a full batch always fits an idle device's bucket
BURST_SECONDS = 10.0
R = TypeVar("R", device_pb.ReportTelemetryResponse, device_pb.StreamTelemetryResponse)
# StreamTelemetry reads at most this many messages ahead of those being stored.
STREAM_READ_AHEAD = 16


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
        self, principal: Principal, device_id: str, batches: list[list[telemetry.Reading]], answer: type[R]
    ) -> list[R] | None:
        """One `answer` (ReportTelemetryResponse or StreamTelemetryResponse) per batch: the
        batches stored in order in one transaction, each by itself (its results as if it came
        alone), and their slots decided once, after the last; each answer shows its slots'
        levels after it with that decision. None when storing or deciding raised a DomainError
        for several batches: the caller then reports them one by one, so that the batches
        before the failing one are stored and answered."""
        now = now_micros()
        by_device = principal.kind == "device"

        def work(connection: Any) -> tuple[list[telemetry.Batch], list[SlotDecision]]:
            # One unit: the readings and the decisions they lead to commit together, or not at
            # all. Concurrent reports share a transaction (Database.write_joined, a savepoint
            # each): a report is answered, and its readings ACCEPTED, once that has committed.
            stored = [
                telemetry.record(connection, device_id, batch, now, by_device, self.ordering.series)
                for batch in batches
            ]
            slots = dict.fromkeys(slot_id for found in stored for slot_id in found.levels)
            return stored, [self._decide(connection, device_id, slot_id) for slot_id in slots]

        try:
            stored, decisions = await self.store.db.write_joined(work)
        except DomainError:
            if len(batches) == 1:
                raise
            return None
        for decision in decisions:
            await self.ordering.placed(decision)
        decided = {decision.slot_id: decision for decision in decisions}
        return [
            answer(
                results=[
                    device_pb.ReadingResult(
                        reading_id=r.reading_id,
                        status=STATUSES[r.status],  # type: ignore[arg-type]
                        field=r.field,
                        reason=r.reason,
                        description=r.description,
                        refill_detected=r.refill,
                    )
                    for r in found.results
                ],
                slot_outcomes=[
                    slot_outcome(decided[slot_id], level) for slot_id, level in found.levels.items()
                ],
            )
            for found in stored
        ]

    async def ReportTelemetry(
        self, request: device_pb.ReportTelemetryRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        principal = current_principal()
        check_own_device(principal, request.device_id)
        device_id = _checked_device_id(request.device_id)
        batch = _readings_of(request.readings)
        self.limiter.take(device_id, len(batch), refuse=False)  # counts toward the streams' limit
        answers = await self._report(principal, device_id, [batch], device_pb.ReportTelemetryResponse)
        assert answers is not None  # one batch: its error is raised
        return answers[0]

    def _stream_batch(
        self, principal: Principal, device_id: str, request: device_pb.StreamTelemetryRequest
    ) -> tuple[str, list[telemetry.Reading]]:
        """(the stream's device, the message's readings), or the error that ends the stream."""
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
        return device_id, batch

    async def StreamTelemetry(
        self,
        request_iterator: AsyncIterator[device_pb.StreamTelemetryRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[device_pb.StreamTelemetryResponse]:
        """Each message answered in order. The messages that arrived while earlier ones were
        stored are stored together (up to MAX_READINGS readings a transaction) and their slots
        decided once, after the last of them (shared/request_groups.py)."""
        principal = current_principal()
        device_id = ""
        async with contextlib.aclosing(arrived_together(request_iterator, STREAM_READ_AHEAD)) as groups:
            async for group in groups:
                units: list[list[list[telemetry.Reading]]] = [[]]  # each at most MAX_READINGS readings
                readings = 0
                failure: DomainError | None = None
                for request in group:
                    try:
                        device_id, batch = self._stream_batch(principal, device_id, request)
                    except DomainError as error:  # raised once the messages before it are answered
                        failure = error
                        break
                    if units[-1] and readings + len(batch) > telemetry.MAX_READINGS:
                        units.append([])
                        readings = 0
                    units[-1].append(batch)
                    readings += len(batch)
                for batches in units:
                    if batches:
                        async for reply in self._stream_replies(principal, device_id, batches):
                            yield reply
                if failure is not None:
                    raise failure

    async def _stream_replies(
        self, principal: Principal, device_id: str, batches: list[list[telemetry.Reading]]
    ) -> AsyncIterator[device_pb.StreamTelemetryResponse]:
        reply = device_pb.StreamTelemetryResponse
        answers = await self._report(principal, device_id, batches, reply)
        if answers is None:  # one of them failed: one by one, each answered before the failure
            for batch in batches:
                answers = await self._report(principal, device_id, [batch], reply)
                assert answers is not None
                yield answers[0]
            return
        for answer in answers:
            yield answer

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
