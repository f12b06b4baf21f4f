"""The replenishment decision and exactly-once order creation (the seam other modules call).

`Ordering.consider` decides for one slot, in the order the proto documents
(ReplenishOutcome):

1. the slot has an open order (PENDING, PLACED, SHIPPED): ORDER_IN_PROGRESS;
2. policy OFF: POLICY_OFF;
3. policy NOTIFY_ONLY: NOTIFIED when due (else NOT_NEEDED);
4. the slot or its device is paused: PAUSED;
5. `replenishment.automatic_ordering` not granted in a consent cache no staler than
   NAJIMI_CONSENT_MAX_STALENESS_SECONDS: CONSENT_REQUIRED (a stale cache fails closed;
   a device's Replenish gets UNAVAILABLE CONSENT_STATE_STALE instead, as its proto says);
6. not due: NOT_NEEDED. Due means the forecast (slot_forecasts.py) puts the level at or
   below the reorder point, or the request is explicit (a device's Replenish);
7. another order would exceed the slot's orders or spend per period: LIMIT_REACHED;
8. otherwise ORDER_PLACED: one PENDING order, cancellable for
   NAJIMI_REPLENISHMENT_CANCELLATION_WINDOW_SECONDS, then PLACED (order_worker.py).

A customer's ReplenishSlot (trigger CUSTOMER) is an explicit purchase: only step 1
applies (policy, pause, consent and limits do not; its order still counts toward the
limits).

Exactly once: the partial unique index `orders_one_open_per_slot` allows one open order
per slot. Two deciders racing for one slot both insert; the loser's IntegrityError makes
Database.write run its transaction again, which then finds the winner's order in step 1
(ORDER_IN_PROGRESS with its id).

Each outcome for a due slot goes on the slot feed when it changes (slots.last_outcome):
NOTIFIED as NOTIFICATION, PAUSED/CONSENT_REQUIRED/LIMIT_REACHED as ORDER_SKIPPED with the
outcome (the ORDER_PLACED event comes with the order, orders.create); it is logged too.
A CONSENT_REQUIRED slot is marked for re-evaluation (slots.decision_due_time_us), which
order_worker.py does once the consent state is fresh and granted, without the device
reporting again.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from google.protobuf.message import Message
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment import orders, slot_events
from services.replenishment.devices import DeviceState
from services.replenishment.epoch_series import EpochSeries
from services.replenishment.slot_forecasts import forecast_of_slot
from services.replenishment.slots import DAY_US, reorder_point_moved
from services.replenishment.store import (
    device_deregistered,
    device_not_found,
    devices,
    driver_sql,
    slot_not_found,
    slots,
)
from services.replenishment.store import orders as order_rows
from shared.consent_cache import ConsentCache, consent_state_stale
from shared.db import Database, now_micros
from shared.errors import FailedPrecondition
from shared.idempotency import Idempotency
from shared.log import get_logger

PURPOSE = "replenishment.automatic_ordering"
log = get_logger("najimi.replenishment.ordering")

ORDER_PLACED = pb.REPLENISH_OUTCOME_ORDER_PLACED
ORDER_IN_PROGRESS = pb.REPLENISH_OUTCOME_ORDER_IN_PROGRESS
CONSENT_REQUIRED = pb.REPLENISH_OUTCOME_CONSENT_REQUIRED
PAUSED = pb.REPLENISH_OUTCOME_PAUSED
LIMIT_REACHED = pb.REPLENISH_OUTCOME_LIMIT_REACHED
NOT_NEEDED = pb.REPLENISH_OUTCOME_NOT_NEEDED
NOTIFIED = pb.REPLENISH_OUTCOME_NOTIFIED
POLICY_OFF = pb.REPLENISH_OUTCOME_POLICY_OFF
# Outcomes that skip an order the slot is due for: ORDER_SKIPPED on the slot feed.
SKIPPED = (CONSENT_REQUIRED, PAUSED, LIMIT_REACHED)


def outcome_name(outcome: int) -> str:
    return pb.ReplenishOutcome.Name(outcome).removeprefix("REPLENISH_OUTCOME_")  # type: ignore[arg-type]


class Consent(enum.Enum):
    GRANTED = "GRANTED"
    DENIED = "DENIED"
    STALE = "STALE"  # the cache is staler than its bound: no decision (fail closed)


@dataclass(frozen=True)
class SlotDecision:
    device_id: str
    slot_id: str
    outcome: int  # pb.ReplenishOutcome value; the device package uses the same numbers
    order_id: str = ""  # the order placed, or the open order for ORDER_IN_PROGRESS
    reason: str = ""  # one line for people: why this outcome
    level: float = 0.0  # the slot's current level (latest by measure_time)
    expected_delivery_time_us: int | None = None  # of the new or open order
    retry_time_us: int | None = None  # LIMIT_REACHED: when a limit frees up; NOT_NEEDED: the reorder time


def _money(micros: int, currency: str) -> str:
    return f"{micros / 1_000_000:.2f} {currency}"


def _days(micros: int) -> str:
    days = micros / DAY_US
    return f"{days:g} days" if days >= 1 else f"{micros / 3_600_000_000:g} hours"


@dataclass(frozen=True)
class _Device:
    """What a decision needs of the device."""

    device_id: str
    customer_id: str
    paused: bool
    test: bool


@dataclass(frozen=True)
class _OpenOrder:
    order_id: str
    state: str
    delivery_time_us: int | None  # the carrier's estimate, else the expected delivery


# The device, the slot and its open order in one driver-SQL query (store.driver_sql): the
# decision runs for every telemetry report, where three SQLAlchemy queries cost more than
# the database's work. SQLite gives booleans as 0/1, hence bool() below.
_DECISION_ROWS = (
    "SELECT s.*, d.customer_id AS device_customer_id, d.state AS device_state, "
    "d.paused AS device_paused, d.test AS device_test, o.order_id AS open_order_id, "
    "o.state AS open_order_state, o.estimated_delivery_time_us AS open_order_estimated_us, "
    "o.expected_delivery_time_us AS open_order_expected_us "
    "FROM slots s JOIN devices d ON d.device_id = s.device_id "
    "LEFT JOIN orders o ON o.device_id = s.device_id AND o.slot_id = s.slot_id "
    "AND o.state IN ('PENDING', 'PLACED', 'SHIPPED') "
    "WHERE s.device_id = ? AND s.slot_id = ?"
)


def _decision_rows(
    connection: Connection, device_id: str, slot_id: str
) -> tuple[_Device, Any, _OpenOrder | None]:
    """The active device, its slot (a row with the slots table's columns) and the slot's open
    order: NOT_FOUND for a missing device, FAILED_PRECONDITION for a retired one, then
    NOT_FOUND (SLOT_NOT_FOUND) for a missing slot, in that order."""
    row = driver_sql(connection, _DECISION_ROWS, (device_id, slot_id)).first()
    if row is None:
        state = connection.execute(
            sa.select(devices.c.state).where(devices.c.device_id == device_id)
        ).scalar()
        if state is None:
            raise device_not_found(device_id)
        if state != DeviceState.ACTIVE.value:
            raise device_deregistered(device_id)
        raise slot_not_found(device_id, slot_id)
    if row.device_state != DeviceState.ACTIVE.value:
        raise device_deregistered(device_id)
    device = _Device(device_id, row.device_customer_id, bool(row.device_paused), bool(row.device_test))
    current = None
    if row.open_order_id is not None:
        current = _OpenOrder(
            row.open_order_id,
            row.open_order_state,
            row.open_order_estimated_us or row.open_order_expected_us,
        )
    return device, row, current


class Ordering:
    """One per process: decides for slots and creates their orders."""

    def __init__(
        self,
        database: Database,
        consent: ConsentCache,
        *,
        cancellation_window_seconds: float,
        max_consent_staleness_seconds: float,
        clock: Callable[[], int] = now_micros,
    ):
        self.db = database
        self.consent = consent
        self.window_us = round(cancellation_window_seconds * 1_000_000)
        self.max_staleness = max_consent_staleness_seconds
        self.clock = clock
        # Each slot's current epoch readings, kept between decisions (epoch_series.py);
        # telemetry.record extends them.
        self.series = EpochSeries()
        # Awaited (on the event loop) after a decision committed: wakes the watchers of the
        # order and slot feeds (the decision, and the telemetry before it, may write to both).
        self.on_commit: Callable[[], Awaitable[None]] | None = None

    def consent_of(self, customer_id: str) -> Consent:
        decision = self.consent.check_fresh(customer_id, PURPOSE, (), self.max_staleness)
        if decision is None:
            return Consent.STALE
        return Consent.GRANTED if decision.allowed else Consent.DENIED

    async def consider(
        self,
        device_id: str,
        slot_id: str,
        *,
        trigger: int,  # pb.OrderTrigger value: AUTOMATIC (telemetry), DEVICE_REQUEST or CUSTOMER
        explicit: bool = False,  # Replenish/ReplenishSlot: order even above the reorder point
        request_id: str = "",
        quantity: int = 0,  # CUSTOMER only: 0 means the slot's reorder_quantity
    ) -> SlotDecision:
        """The decision for one slot, in its own transaction (see the module docstring)."""
        decision = await self.db.write(
            lambda connection: self.decide(
                connection,
                device_id,
                slot_id,
                trigger=trigger,
                explicit=explicit,
                request_id=request_id,
                quantity=quantity,
            )
        )
        await self.placed(decision)
        return decision

    async def decide_once(
        self,
        replies: Idempotency,
        principal: str,
        rpc: str,
        request: Message,
        reply: Callable[[Connection, SlotDecision], Message],
        *,
        trigger: int,  # DEVICE_REQUEST (a device's Replenish) or CUSTOMER (ReplenishSlot)
        quantity: int = 0,
    ) -> bytes:
        """An explicit request's first reply (serialized), once per request_id.

        The decision, the order it creates and the stored reply commit in one transaction
        (Idempotency.run): a crash leaves either all three or none, and concurrent copies of
        the request wait on the claimed request id, then answer with the winner's reply.
        `request` names device_id, slot_id and request_id; `reply` builds the answer from the
        decision in the same transaction."""
        device_id, slot_id = request.device_id, request.slot_id  # type: ignore[attr-defined]
        made: list[SlotDecision] = []

        def transaction(connection: Connection) -> bytes:
            made.clear()  # Database.write may run it again (a concurrent copy won the key)
            owner = connection.execute(
                sa.select(devices.c.customer_id).where(devices.c.device_id == device_id)
            ).scalar()

            def carry_out(connection: Connection) -> bytes:
                decision = self.decide(
                    connection,
                    device_id,
                    slot_id,
                    trigger=trigger,
                    explicit=True,
                    request_id=request.request_id,  # type: ignore[attr-defined]
                    quantity=quantity,
                )
                made.append(decision)
                return reply(connection, decision).SerializeToString()

            stored, _ = replies.run(connection, principal, rpc, request, carry_out, owner)
            return stored

        stored = await self.db.write(transaction)
        for decision in made:
            await self.placed(decision)
        return stored

    async def placed(self, decision: SlotDecision) -> None:
        """Call after committing a decision made with `decide`: wakes the feeds' watchers."""
        if self.on_commit is not None:
            await self.on_commit()

    def decide(
        self,
        connection: Connection,
        device_id: str,
        slot_id: str,
        *,
        trigger: int,
        explicit: bool = False,
        request_id: str = "",
        quantity: int = 0,
    ) -> SlotDecision:
        """The decision in the caller's write transaction (e.g. inside Idempotency.run, so a
        request_id's first answer and its order commit together)."""
        now = self.clock()
        device, slot, current = _decision_rows(connection, device_id, slot_id)
        level = float(slot.level or 0.0)
        customer = trigger == pb.ORDER_TRIGGER_CUSTOMER
        reorder_point = slot.reorder_point  # kept unless a forecast is computed below

        def answer(outcome: int, reason: str, due: bool, **fields: object) -> SlotDecision:
            decision = SlotDecision(device_id, slot_id, outcome, reason=reason, level=level, **fields)  # type: ignore[arg-type]
            self._record(connection, device, slot, decision, due, now, explicit or customer, reorder_point)
            return decision

        if current is not None:
            return answer(
                ORDER_IN_PROGRESS,
                f"order {current.order_id} is {current.state.lower()}",
                True,
                order_id=current.order_id,
                expected_delivery_time_us=current.delivery_time_us,
            )
        if customer:
            return answer(
                ORDER_PLACED,
                "ordered on the customer's request",
                True,
                **self._create(
                    connection,
                    device,
                    slot,
                    trigger,
                    quantity or slot.reorder_quantity,
                    request_id,
                    now,
                    level,
                ),
            )
        if slot.policy == "OFF":
            return answer(POLICY_OFF, "automatic ordering is off for this slot", False)
        found = forecast_of_slot(connection, slot, now, self.series)
        result = found.result
        # The slot's status (LOW) follows the forecast's reorder point once it has a rate.
        reorder_point = result.reorder_point if result.rate_per_day is not None else None
        if found.has_data:
            level = result.level
        due = explicit or (found.has_data and result.order_now)
        if slot.policy == "NOTIFY_ONLY":
            if due:
                return answer(NOTIFIED, f"time to reorder: {result.explanation}", True)
            return answer(NOT_NEEDED, result.explanation, False, retry_time_us=result.reorder_time_us)
        if slot.paused or device.paused:
            what = "slot" if slot.paused else "device"
            return answer(PAUSED, f"ordering is paused for this {what}", due)
        consent = self.consent_of(device.customer_id)
        if consent is not Consent.GRANTED:
            if consent is Consent.STALE and trigger == pb.ORDER_TRIGGER_DEVICE_REQUEST:
                raise consent_state_stale("order")
            reason = (
                "the consent state cannot be confirmed right now; ordering waits"
                if consent is Consent.STALE
                else "automatic ordering needs the customer's consent"
            )
            return answer(CONSENT_REQUIRED, reason, due)
        if not due:
            return answer(NOT_NEEDED, result.explanation, False, retry_time_us=result.reorder_time_us)
        limited = self._limit(connection, slot, slot.reorder_quantity * slot.unit_price_micros, now)
        if limited is not None:
            reason, retry = limited
            return answer(LIMIT_REACHED, reason, True, retry_time_us=retry)
        reason = "ordered on the device's request" if explicit else f"running low: {result.explanation}"
        return answer(
            ORDER_PLACED,
            reason,
            True,
            **self._create(connection, device, slot, trigger, slot.reorder_quantity, request_id, now, level),
        )

    def _create(
        self,
        connection: Connection,
        device: _Device,
        slot: sa.Row,
        trigger: int,
        quantity: int,
        request_id: str,
        now: int,
        level: float,
    ) -> dict[str, object]:
        if slot.unit_price_micros <= 0 or not slot.currency_code:
            raise FailedPrecondition(
                f"slot {slot.slot_id} has no unit price: it cannot be ordered", reason="PRICE_UNKNOWN"
            )
        row = orders.create(
            connection,
            orders.NewOrder(
                device_id=device.device_id,
                slot_id=slot.slot_id,
                customer_id=device.customer_id,
                item_id=slot.item_id,
                quantity=quantity,
                unit_price_micros=slot.unit_price_micros,
                currency_code=slot.currency_code,
                trigger=orders.trigger_name(trigger),
                test=device.test,
                request_id=request_id,
                pending_until_us=now + self.window_us,
                expected_delivery_time_us=now + slot.lead_time_us,
            ),
            now,
            level=level,
        )
        return dict(order_id=row.order_id, expected_delivery_time_us=row.expected_delivery_time_us)

    @staticmethod
    def _limit(connection: Connection, slot: sa.Row, price: int, now: int) -> tuple[str, int] | None:
        """Why another order of `price` would exceed the slot's limits, and when that frees up."""
        if not slot.max_orders_per_period and not slot.max_spend_micros:
            return None
        period = slot.limit_period_us
        counted = connection.execute(
            sa.select(order_rows.c.total_price_micros, order_rows.c.create_time_us)
            .where(
                order_rows.c.device_id == slot.device_id,
                order_rows.c.slot_id == slot.slot_id,
                order_rows.c.state != orders.CANCELLED,
                order_rows.c.create_time_us > now - period,
            )
            .order_by(order_rows.c.create_time_us)
        ).all()
        if slot.max_orders_per_period and len(counted) + 1 > slot.max_orders_per_period:
            frees = counted[len(counted) - slot.max_orders_per_period].create_time_us + period
            return f"limit of {slot.max_orders_per_period} orders per {_days(period)} reached", frees
        spent = sum(row.total_price_micros for row in counted)
        if slot.max_spend_micros and spent + price > slot.max_spend_micros:
            # Frees up once enough of the oldest orders leave the window.
            over, frees = spent + price - slot.max_spend_micros, now
            for row in counted:
                over -= row.total_price_micros
                frees = row.create_time_us + period
                if over <= 0:
                    break
            limit = _money(slot.max_spend_micros, slot.currency_code)
            return f"spend limit of {limit} per {_days(period)} reached", frees
        return None

    def _record(
        self,
        connection: Connection,
        device: _Device,
        slot: sa.Row,
        decision: SlotDecision,
        due: bool,
        now: int,
        asked: bool,
        reorder_point: float | None,
    ) -> None:
        """Keeps the slot's latest decision and its forecast's reorder point; a changed decision
        for a due slot goes on the feed."""
        # A skip that does not matter yet (paused or without consent, but not due) is kept as
        # NOT_NEEDED, so the skip is announced when the slot does become due.
        outcome = decision.outcome if due or decision.outcome not in SKIPPED else NOT_NEEDED
        name = outcome_name(outcome)
        deferred = (slot.decision_due_time_us or now) if outcome == CONSENT_REQUIRED else None
        moved = reorder_point_moved(slot.reorder_point, reorder_point, slot.capacity)
        if name != slot.last_outcome or deferred != slot.decision_due_time_us or moved:
            connection.execute(
                slots.update()
                .where(slots.c.device_id == slot.device_id, slots.c.slot_id == slot.slot_id)
                .values(
                    last_outcome=name,
                    last_outcome_time_us=now,
                    decision_due_time_us=deferred,
                    reorder_point=reorder_point,
                )
            )
        changed = name != slot.last_outcome
        if changed or asked:
            log.info(
                "replenish_decision",
                device_id=slot.device_id,
                slot_id=slot.slot_id,
                outcome=outcome_name(decision.outcome),
                order_id=decision.order_id,
                reason=decision.reason,
            )
        if not changed or outcome not in (*SKIPPED, NOTIFIED):
            return
        slot_events.append(
            connection,
            customer_id=device.customer_id,
            device_id=slot.device_id,
            slot_id=slot.slot_id,
            event_type="NOTIFICATION" if outcome == NOTIFIED else "ORDER_SKIPPED",
            now_us=now,
            outcome=name,
            level=decision.level,
            message=f"{slot.display_name or slot.slot_id}: {decision.reason}",
            test=device.test,
        )
