"""The replenishment decision, orders and the order feed, over real gRPC with a real consent service.

Readings go straight into the readings table (as telemetry stores them), then the
service's own Ordering decides: the decision rules are tested one by one in the
documented order, with the consent state coming from a real consent service through
the service's consent cache.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import duration_pb2, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from services.replenishment.store import orders, readings, slot_events, slots
from shared.db import now_micros
from tests.conftest import error_reason, field_violations, rpc_error

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US
PURPOSE = "replenishment.automatic_ordering"
CUSTOMER = "cus_orders"


class Suite:
    """A consent service and a replenishment service following it."""

    def __init__(self, replenishment: Any, consent: Any):
        self.service = replenishment
        self.consent_service = consent
        self.stub = pb_grpc.ReplenishmentServiceStub(replenishment.channel)
        self.consent = consent_grpc.ConsentServiceStub(consent.channel)
        app = replenishment.running.app
        self.servicer = app.registrations[0].servicer
        self.ordering = self.servicer.orders.ordering
        self.db = self.servicer.store.db
        self.admin = replenishment.auth("admin")
        self.storefront = replenishment.auth("service:storefront")
        self.fulfilment = replenishment.auth("service:fulfilment")
        self._grants = 0

    async def register(self, serial: str = "SN-1", test: bool = False, **slot: Any) -> str:
        values: dict[str, Any] = dict(
            slot_id="black",
            display_name="Black ink",
            item_id="ink-black",
            capacity=100.0,
            unit="ml",
            unit_price_micros=20_000_000,
            currency_code="EUR",
            policy=pb.SLOT_POLICY_AUTO,
            lead_time=duration_pb2.Duration(seconds=3 * 86_400),
            fallback_reorder_level=20.0,
        )
        values.update(slot)
        response = await self.stub.RegisterDevice(
            pb.RegisterDeviceRequest(
                request_id=f"reg-{serial}",
                customer_id=CUSTOMER,
                manufacturer="acme",
                model="inkjet",
                kind="printer",
                serial_number=serial,
                slots=[pb.Slot(**values)],
                test=test,
            ),
            metadata=self.storefront,
        )
        return response.device.device_id

    async def readings(self, device_id: str, levels: list[float], slot_id: str = "black") -> None:
        """Daily readings ending now, as telemetry stores them."""
        now = now_micros()
        start = now - (len(levels) - 1) * DAY_US

        def store(connection: sa.Connection) -> None:
            epoch = connection.execute(
                sa.select(slots.c.epoch).where(slots.c.device_id == device_id, slots.c.slot_id == slot_id)
            ).scalar_one()
            for index, level in enumerate(levels):
                connection.execute(
                    readings.insert().values(
                        device_id=device_id,
                        reading_id=f"r-{slot_id}-{now}-{index}",
                        slot_id=slot_id,
                        level=level,
                        measure_time_us=start + index * DAY_US,
                        receive_time_us=now,
                        epoch=epoch,
                    )
                )
            connection.execute(
                slots.update()
                .where(slots.c.device_id == device_id, slots.c.slot_id == slot_id)
                .values(level=levels[-1], level_time_us=now, level_source="READING")
            )

        await self.db.write(store)

    async def decide(self, device_id: str, slot_id: str = "black", **options: Any) -> Any:
        options.setdefault("trigger", pb.ORDER_TRIGGER_AUTOMATIC)
        return await self.ordering.consider(device_id, slot_id, **options)

    async def grant(self, customer: str = CUSTOMER) -> None:
        self._grants += 1
        granted = await self.consent.GrantConsent(
            consent_pb.GrantConsentRequest(
                customer_id=customer,
                purpose=PURPOSE,
                data_categories=["user.device.telemetry"],
                notice_version=1,
                collection_method=consent_pb.COLLECTION_METHOD_WEB_FORM,
                jurisdiction="DE",
                request_id=f"grant-{self._grants}",
            ),
            metadata=self.consent_service.auth("service:storefront"),
        )
        assert await self.ordering.consent.wait_for_revision(granted.consent.revision, 10)

    async def withdraw(self, customer: str = CUSTOMER) -> None:
        self._grants += 1
        withdrawn = await self.consent.WithdrawConsent(
            consent_pb.WithdrawConsentRequest(
                customer_id=customer,
                purpose=PURPOSE,
                collection_method=consent_pb.COLLECTION_METHOD_MOBILE_APP,
                jurisdiction="DE",
                request_id=f"withdraw-{self._grants}",
            ),
            metadata=self.consent_service.auth("service:storefront"),
        )
        assert await self.ordering.consent.wait_for_revision(withdrawn.consent.revision, 10)

    async def order(self, order_id: str) -> pb.Order:
        return (await self.stub.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=self.admin)).order

    async def decisions_on_feed(self, device_id: str) -> list[tuple[str, str]]:
        """The slot events of decisions and orders (not registration, telemetry or pause)."""
        kinds = ("ORDER_", "NOTIFICATION")
        return [event for event in await self.slot_feed(device_id) if event[0].startswith(kinds)]

    async def slot_feed(self, device_id: str) -> list[tuple[str, str]]:
        def read(connection: sa.Connection) -> list[tuple[str, str]]:
            rows = connection.execute(
                sa.select(slot_events.c.type, slot_events.c.outcome)
                .where(slot_events.c.device_id == device_id)
                .order_by(slot_events.c.revision)
            )
            return [(row.type, row.outcome or "") for row in rows]

        return await self.db.read(read)


@pytest.fixture
async def suite(start_service, dev_tokens):
    async def start(database_url: str | None = None, **settings: Any) -> Suite:
        shared_database = database_url if database_url and database_url.startswith("postgresql") else None
        consent = await start_service("consent", shared_database)
        settings.setdefault("replenishment_promotion_interval_seconds", 0.1)
        replenishment = await start_service(
            "replenishment",
            database_url,
            consent_address=f"127.0.0.1:{consent.running.port}",
            service_token=dev_tokens["service:replenishment"],
            **settings,
        )
        found = Suite(replenishment, consent)
        assert await found.ordering.consent.wait_synced(10), "the consent cache did not sync"
        return found

    return start


async def until(condition, timeout: float = 10.0) -> None:
    """Polls `condition()` (sync or async) until it is true, or fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


LOW = [90.0, 80.0, 70.0, 60.0, 50.0, 40.0, 30.0, 20.0, 10.0]  # 10 a day: 1 day left, lead time 3
FULL = [100.0, 99.0, 98.0, 97.0, 96.0, 95.0]  # 1 a day: far above the reorder point


# -- the decision, rule by rule ----------------------------------------------------------------


async def test_a_due_auto_slot_with_consent_orders_once_then_is_in_progress(suite, database_url):
    s = await suite(database_url)
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    first = await s.decide(device)
    assert first.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED, first.reason
    order = await s.order(first.order_id)
    assert order.state == pb.ORDER_STATE_PENDING and order.trigger == pb.ORDER_TRIGGER_AUTOMATIC
    assert order.total_price_micros == 20_000_000 and order.currency_code == "EUR" and not order.test
    window = order.cancel_deadline_time.ToMicroseconds() - order.create_time.ToMicroseconds()
    assert window == 86_400 * 1_000_000  # the default cancellation window
    again = await s.decide(device)
    assert again.outcome == pb.REPLENISH_OUTCOME_ORDER_IN_PROGRESS and again.order_id == first.order_id
    assert await s.decisions_on_feed(device) == [("ORDER_PLACED", "ORDER_PLACED")]


async def test_policy_off_and_notify_only(suite):
    s = await suite()
    await s.grant()
    off = await s.register("SN-off", policy=pb.SLOT_POLICY_OFF)
    await s.readings(off, LOW)
    assert (await s.decide(off)).outcome == pb.REPLENISH_OUTCOME_POLICY_OFF
    notify = await s.register("SN-notify", policy=pb.SLOT_POLICY_NOTIFY_ONLY)
    await s.readings(notify, FULL)
    assert (await s.decide(notify)).outcome == pb.REPLENISH_OUTCOME_NOT_NEEDED
    await s.readings(notify, LOW)
    assert (await s.decide(notify)).outcome == pb.REPLENISH_OUTCOME_NOTIFIED
    assert (await s.decide(notify)).outcome == pb.REPLENISH_OUTCOME_NOTIFIED
    # One NOTIFICATION for the change, none for the repeat; OFF slots are silent.
    assert ("NOTIFICATION", "NOTIFIED") in await s.slot_feed(notify)
    assert [e for e in await s.slot_feed(notify) if e[0] == "NOTIFICATION"] == [("NOTIFICATION", "NOTIFIED")]
    assert await s.decisions_on_feed(off) == []


async def test_a_paused_slot_is_paused_and_says_so_once(suite):
    s = await suite()
    await s.grant()
    device = await s.register()
    # PauseSlot's effect (rp-devices' RPC): the slot's paused flag.
    await s.db.write(
        lambda c: c.execute(slots.update().where(slots.c.device_id == device).values(paused=True))
    )
    await s.readings(device, LOW)
    assert (await s.decide(device)).outcome == pb.REPLENISH_OUTCOME_PAUSED
    assert (await s.decide(device)).outcome == pb.REPLENISH_OUTCOME_PAUSED
    skipped = [e for e in await s.slot_feed(device) if e[0] == "ORDER_SKIPPED"]
    assert skipped == [("ORDER_SKIPPED", "PAUSED")]


async def test_without_consent_no_order_and_a_grant_orders_without_a_new_report(suite):
    s = await suite()
    device = await s.register()
    await s.readings(device, LOW)
    decision = await s.decide(device)
    assert decision.outcome == pb.REPLENISH_OUTCOME_CONSENT_REQUIRED
    assert ("ORDER_SKIPPED", "CONSENT_REQUIRED") in await s.slot_feed(device)
    # The grant reaches the cache; the worker decides again by itself.
    await s.grant()

    async def ordered() -> bool:
        found = await s.stub.ListOrders(pb.ListOrdersRequest(device_id=device), metadata=s.storefront)
        return len(found.orders) == 1

    await until(ordered)


async def test_above_the_reorder_point_not_needed_unless_explicit(suite):
    s = await suite()
    await s.grant()
    device = await s.register()
    await s.readings(device, FULL)
    assert (await s.decide(device)).outcome == pb.REPLENISH_OUTCOME_NOT_NEEDED
    explicit = await s.decide(device, trigger=pb.ORDER_TRIGGER_DEVICE_REQUEST, explicit=True)
    assert explicit.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    assert (await s.order(explicit.order_id)).trigger == pb.ORDER_TRIGGER_DEVICE_REQUEST


async def test_limits_on_orders_and_spend_per_period(suite):
    s = await suite()
    await s.grant()
    device = await s.register(limits=pb.SlotLimits(max_orders_per_period=1))
    await s.readings(device, LOW)
    first = await s.decide(device)
    assert first.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    await s.stub.CancelOrder(
        pb.CancelOrderRequest(order_id=first.order_id, request_id="c1"), metadata=s.storefront
    )
    # A cancelled order does not count.
    second = await s.decide(device)
    assert second.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    await s.db.write(
        lambda c: c.execute(
            orders.update().where(orders.c.order_id == second.order_id).values(state="DELIVERED")
        )
    )
    limited = await s.decide(device)
    assert limited.outcome == pb.REPLENISH_OUTCOME_LIMIT_REACHED and "1 orders per 30 days" in limited.reason
    assert limited.retry_time_us > now_micros() + 29 * DAY_US
    spend = await s.register(
        "SN-spend", limits=pb.SlotLimits(max_spend_micros=15_000_000, currency_code="EUR")
    )
    await s.readings(spend, LOW)
    over = await s.decide(spend)  # one order of 20.00 is over 15.00
    assert over.outcome == pb.REPLENISH_OUTCOME_LIMIT_REACHED and "15.00 EUR" in over.reason


async def test_a_test_device_places_test_orders_hidden_from_fulfilment(suite):
    s = await suite()
    await s.grant()
    device = await s.register(test=True)
    await s.readings(device, LOW)
    decision = await s.decide(device)
    assert (await s.order(decision.order_id)).test
    fulfilment = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(), metadata=s.fulfilment)
    assert list(fulfilment.events) == [] and fulfilment.current_revision == 1
    admin = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(), metadata=s.admin)
    assert [e.order.order_id for e in admin.events] == [decision.order_id]
