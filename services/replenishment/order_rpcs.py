"""The order RPCs of ReplenishmentService (thin: checks, one transaction, messages out).

GetSlotForecast, ReplenishSlot, GetOrder, ListOrders, CancelOrder, ShipOrder,
DeliverOrder, RejectOrder, ListOrderEvents, WatchOrderEvents. ReplenishmentServicer
(servicer.py) mixes them in; the rules live in ordering.py, orders.py and order_feed.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import sqlalchemy as sa
from google.protobuf.message import Message
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment import order_feed, orders
from services.replenishment.order_feed import OrderFeed
from services.replenishment.ordering import Ordering, SlotDecision
from services.replenishment.slot_forecasts import current_forecast
from services.replenishment.slots import SLOT_ID
from services.replenishment.store import ReplenishmentStore
from services.replenishment.store import orders as order_rows
from shared.access_policy import CUSTOMER_FACING
from shared.auth import current_principal
from shared.errors import FailedPrecondition, InvalidArgument
from shared.page_tokens import ServiceTokens
from shared.proto_time import micros_from, seconds_from
from shared.validation import Violations, page_size_of

DEFAULT_HEARTBEAT_SECONDS = 15.0
NOTE_MAX = 500


@dataclass
class OrderDesk:
    """What the order RPCs work with, beside the store."""

    ordering: Ordering
    feed: OrderFeed
    pages: ServiceTokens


def _check(build: Callable[[Violations], object]) -> None:
    violations = Violations()
    build(violations)
    violations.raise_if_any()


def _event_time(violations: Violations, request: Any, now: int) -> int | None:
    """The request's event_time (unset: now), not in the future; the order check comes later."""
    if not request.HasField("event_time"):
        return now
    return micros_from(
        request.event_time,
        "event_time",
        not_after=now,
        bounds="must not be in the future",
        violations=violations,
    )


def _not_before_last_change(row: sa.Row, event_time: int) -> None:
    if event_time < row.update_time_us:
        raise InvalidArgument("event_time", "must not be before the order's last change")


class OrderRpcs:
    store: ReplenishmentStore
    orders: OrderDesk

    # -- helpers ----------------------------------------------------------------------------

    async def _once_on_order(
        self,
        request: Message,
        order_id: str,
        rpc: str,
        work: Callable[[Connection, sa.Row], sa.Row],
        reply: type[Message],
    ) -> Any:
        """Runs `work(connection, order)` once per request_id (none: every call) and answers
        with the order it returns."""
        principal = str(current_principal())

        def transaction(connection: Connection) -> bytes:
            row = orders.load(connection, order_id)

            def carry_out(connection: Connection) -> bytes:
                changed = work(connection, orders.load(connection, order_id))
                return reply(order=orders.order_message(changed)).SerializeToString()  # type: ignore[call-arg]

            if not request.request_id:  # type: ignore[attr-defined]
                return carry_out(connection)
            stored, _ = self.store.idempotency.run(
                connection, principal, rpc, request, carry_out, row.customer_id
            )
            return stored

        answer = await self.store.db.write(transaction)
        await self.orders.feed.notify()
        return reply.FromString(answer)

    # -- forecast and explicit orders ---------------------------------------------------------

    async def GetSlotForecast(
        self, request: pb.GetSlotForecastRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("device_id", request.device_id)
        violations.require_id("slot_id", request.slot_id, SLOT_ID)
        violations.raise_if_any()
        now = self.orders.ordering.clock()

        def read(connection: Connection) -> pb.SlotForecast:
            return current_forecast(connection, request.device_id, request.slot_id, now)

        return pb.GetSlotForecastResponse(forecast=await self.store.db.read(read))

    async def ReplenishSlot(self, request: pb.ReplenishSlotRequest, context: grpc.aio.ServicerContext) -> Any:
        def checks(v: Violations) -> None:
            v.require_request_id("request_id", request.request_id)
            v.require_id("device_id", request.device_id)
            v.require_id("slot_id", request.slot_id, SLOT_ID)
            v.require_range(
                "quantity", request.quantity, 0, 100, "must be 1 to 100, or 0 for the slot's reorder_quantity"
            )

        _check(checks)

        def reply(connection: Connection, decision: SlotDecision) -> pb.ReplenishSlotResponse:
            order = orders.order_message(orders.load(connection, decision.order_id))
            return pb.ReplenishSlotResponse(outcome=decision.outcome, order=order)  # type: ignore[arg-type]

        stored = await self.orders.ordering.decide_once(
            self.store.idempotency,
            str(current_principal()),
            "ReplenishSlot",
            request,
            reply,
            trigger=pb.ORDER_TRIGGER_CUSTOMER,
            quantity=request.quantity,
        )
        return pb.ReplenishSlotResponse.FromString(stored)

    # -- reading orders -----------------------------------------------------------------------

    async def GetOrder(self, request: pb.GetOrderRequest, context: grpc.aio.ServicerContext) -> Any:
        _check(lambda v: v.require_id("order_id", request.order_id))
        row = await self.store.db.read(lambda connection: orders.load(connection, request.order_id))
        return pb.GetOrderResponse(order=orders.order_message(row))

    async def ListOrders(self, request: pb.ListOrdersRequest, context: grpc.aio.ServicerContext) -> Any:
        principal = str(current_principal())

        def checks(v: Violations) -> None:
            if request.customer_id:
                v.require_id("customer_id", request.customer_id)
            if request.device_id:
                v.require_id("device_id", request.device_id)
            if request.slot_id:
                v.require_id("slot_id", request.slot_id, SLOT_ID)
            for index, state in enumerate(request.states):
                if state not in pb.OrderState.values() or state == pb.ORDER_STATE_UNSPECIFIED:
                    v.add(f"states[{index}]", "is not an OrderState")

        _check(checks)
        if request.slot_id and not request.device_id:
            raise InvalidArgument("slot_id", "requires device_id", reason="FILTER_REQUIRED")
        if principal in CUSTOMER_FACING.principals and not (request.customer_id or request.device_id):
            raise InvalidArgument(
                "customer_id", "customer_id or device_id is required", reason="FILTER_REQUIRED"
            )
        size = page_size_of(request.page_size)
        states = sorted({orders.state_name(state) for state in request.states})
        filters = {
            "customer_id": request.customer_id,
            "device_id": request.device_id,
            "slot_id": request.slot_id,
            "states": states,
        }
        position = self.orders.pages.read("ListOrders", request.page_token, filters, (int, str, int))

        def read(connection: Connection) -> tuple[list[sa.Row], int]:
            query = sa.select(order_rows)
            if request.customer_id:
                query = query.where(order_rows.c.customer_id == request.customer_id)
            if request.device_id:
                query = query.where(order_rows.c.device_id == request.device_id)
            if request.slot_id:
                query = query.where(order_rows.c.slot_id == request.slot_id)
            if states:
                query = query.where(order_rows.c.state.in_(states))
            revision = int(position[2]) if position else order_feed.head(connection)
            if position:
                create_time, order_id = int(position[0]), str(position[1])
                query = query.where(
                    sa.or_(
                        order_rows.c.create_time_us < create_time,
                        sa.and_(order_rows.c.create_time_us == create_time, order_rows.c.order_id < order_id),
                    )
                )
            query = query.order_by(order_rows.c.create_time_us.desc(), order_rows.c.order_id.desc()).limit(
                size
            )
            return list(connection.execute(query).all()), revision

        found, revision = await self.store.db.read(read)
        token = ""
        if len(found) == size:
            last = found[-1]
            token = self.orders.pages.issue(
                "ListOrders", filters, (last.create_time_us, last.order_id, revision)
            )
        return pb.ListOrdersResponse(
            orders=[orders.order_message(row) for row in found], next_page_token=token, revision=revision
        )

    # -- changing orders ----------------------------------------------------------------------

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: grpc.aio.ServicerContext) -> Any:
        def checks(v: Violations) -> None:
            v.require_id("order_id", request.order_id)
            v.require_request_id("request_id", request.request_id)
            v.limit_text("note", request.note, NOTE_MAX)

        _check(checks)
        admin = current_principal().is_admin
        now = self.orders.ordering.clock()

        def work(connection: Connection, row: sa.Row) -> sa.Row:
            if row.state == orders.CANCELLED:
                return row
            in_window = row.state == orders.PENDING and now < row.pending_until_us
            if not (in_window or (admin and row.state in (orders.PENDING, orders.PLACED))):
                raise FailedPrecondition(
                    f"order {row.order_id} is {row.state}"
                    + (", past its cancellation window" if row.state == orders.PENDING else "")
                    + ": it can no longer be cancelled",
                    reason="CANCELLATION_WINDOW_CLOSED",
                    metadata={"state": row.state},
                )
            reason = "ADMIN" if admin else "CUSTOMER_REQUEST"
            cancelled = orders.cancel(connection, row, reason, now, request.note, from_placed=admin)
            if cancelled is None:  # moved on meanwhile: decide again on what it is now
                return work(connection, orders.load(connection, row.order_id))
            return cancelled

        return await self._once_on_order(
            request, request.order_id, "CancelOrder", work, pb.CancelOrderResponse
        )

    async def ShipOrder(self, request: pb.ShipOrderRequest, context: grpc.aio.ServicerContext) -> Any:
        now = self.orders.ordering.clock()
        tracking = request.tracking
        violations = Violations()
        violations.require_id("order_id", request.order_id)
        if request.request_id:
            violations.require_request_id("request_id", request.request_id)
        violations.require_text("tracking.carrier", tracking.carrier, 64)
        violations.require_text("tracking.tracking_number", tracking.tracking_number, 128)
        violations.limit_text("tracking.tracking_url", tracking.tracking_url, 2048)
        if tracking.tracking_url and not tracking.tracking_url.startswith("https://"):
            violations.add("tracking.tracking_url", "must be an https URL")
        estimated = None
        if tracking.HasField("estimated_delivery_time"):
            estimated = micros_from(
                tracking.estimated_delivery_time, "tracking.estimated_delivery_time", violations=violations
            )
        event_time = _event_time(violations, request, now)
        violations.raise_if_any()
        assert event_time is not None
        values = dict(
            carrier=tracking.carrier,
            tracking_number=tracking.tracking_number,
            tracking_url=tracking.tracking_url or None,
            estimated_delivery_time_us=estimated,
        )

        def work(connection: Connection, row: sa.Row) -> sa.Row:
            if row.state in (orders.PLACED, orders.SHIPPED):
                _not_before_last_change(row, event_time)
            return orders.ship(connection, row, values, event_time, now)

        return await self._once_on_order(request, request.order_id, "ShipOrder", work, pb.ShipOrderResponse)

    async def DeliverOrder(self, request: pb.DeliverOrderRequest, context: grpc.aio.ServicerContext) -> Any:
        now = self.orders.ordering.clock()
        violations = Violations()
        violations.require_id("order_id", request.order_id)
        if request.request_id:
            violations.require_request_id("request_id", request.request_id)
        event_time = _event_time(violations, request, now)
        violations.raise_if_any()
        assert event_time is not None

        def work(connection: Connection, row: sa.Row) -> sa.Row:
            if row.state in (orders.PLACED, orders.SHIPPED):
                _not_before_last_change(row, event_time)
            return orders.deliver(connection, row, event_time, now)

        return await self._once_on_order(
            request, request.order_id, "DeliverOrder", work, pb.DeliverOrderResponse
        )

    async def RejectOrder(self, request: pb.RejectOrderRequest, context: grpc.aio.ServicerContext) -> Any:
        now = self.orders.ordering.clock()
        violations = Violations()
        violations.require_id("order_id", request.order_id)
        if request.request_id:
            violations.require_request_id("request_id", request.request_id)
        if (
            request.reason not in pb.RejectionReason.values()
            or request.reason == pb.REJECTION_REASON_UNSPECIFIED
        ):
            violations.add("reason", "must be a RejectionReason other than UNSPECIFIED")
        violations.limit_text("note", request.note, NOTE_MAX)
        event_time = _event_time(violations, request, now)
        violations.raise_if_any()
        assert event_time is not None
        reason = pb.RejectionReason.Name(request.reason).removeprefix("REJECTION_REASON_")

        def work(connection: Connection, row: sa.Row) -> sa.Row:
            if row.state in (orders.PLACED, orders.SHIPPED):
                _not_before_last_change(row, event_time)
            return orders.reject(connection, row, reason, request.note, event_time, now)

        return await self._once_on_order(
            request, request.order_id, "RejectOrder", work, pb.RejectOrderResponse
        )

    # -- the order feed -----------------------------------------------------------------------

    async def ListOrderEvents(
        self, request: pb.ListOrderEventsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        _check(lambda v: v.require_count("since_revision", request.since_revision))
        size = page_size_of(request.page_size)
        with_test = current_principal().is_admin
        filters = {"since_revision": request.since_revision, "with_test": with_test}
        position = self.orders.pages.read("ListOrderEvents", request.page_token, filters, (int,))
        since = int(position[0]) if position else request.since_revision

        def read(connection: Connection) -> tuple[list[sa.Row], int]:
            current = order_feed.check_since(connection, request.since_revision)
            return order_feed.events_after(connection, since, size, with_test), current

        found, current = await self.store.db.read(read)
        token = (
            self.orders.pages.issue("ListOrderEvents", filters, (found[-1].revision,))
            if len(found) == size
            else ""
        )
        return pb.ListOrderEventsResponse(
            events=[order_feed.event_message(row) for row in found],
            next_page_token=token,
            current_revision=current,
        )

    async def WatchOrderEvents(
        self, request: pb.WatchOrderEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchOrderEventsResponse]:
        violations = Violations()
        violations.require_count("since_revision", request.since_revision)
        interval = DEFAULT_HEARTBEAT_SECONDS
        if request.HasField("heartbeat_interval"):
            interval = (
                seconds_from(
                    request.heartbeat_interval,
                    "heartbeat_interval",
                    at_least=1,
                    at_most=60,
                    violations=violations,
                )
                or DEFAULT_HEARTBEAT_SECONDS
            )
        violations.raise_if_any()
        with_test = current_principal().is_admin
        async for message in self.orders.feed.watch(request.since_revision, interval, with_test):
            yield message
