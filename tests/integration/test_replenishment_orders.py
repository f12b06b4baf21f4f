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
from google.protobuf import duration_pb2, field_mask_pb2, json_format, timestamp_pb2
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from najimi.replenishment.v1 import replenishment_service_pb2_grpc as pb_grpc

from services.replenishment.order_worker import OrderWorker
from services.replenishment.store import order_events as order_events_table
from services.replenishment.store import orders, readings, slot_events, slots
from shared.db import Database, now_micros
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
        self.device_tokens: dict[str, str] = {}  # device_id -> its token, shown at registration

    def device_auth(self, device_id: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.device_tokens[device_id]}"),)

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
        self.device_tokens[response.device.device_id] = response.device_token
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


# -- ReplenishSlot: the customer's explicit order ------------------------------------------------


async def test_replenish_slot_orders_once_per_request_id_without_consent(suite, database_url):
    s = await suite(database_url)
    device = await s.register(policy=pb.SLOT_POLICY_OFF)  # neither policy nor consent apply
    request = pb.ReplenishSlotRequest(request_id="buy-1", device_id=device, slot_id="black", quantity=3)
    first = await s.stub.ReplenishSlot(request, metadata=s.storefront)
    assert first.outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    assert first.order.trigger == pb.ORDER_TRIGGER_CUSTOMER and first.order.quantity == 3
    assert first.order.total_price_micros == 60_000_000
    assert await s.stub.ReplenishSlot(request, metadata=s.storefront) == first  # the first answer
    other = pb.ReplenishSlotRequest(request_id="buy-2", device_id=device, slot_id="black")
    second = await s.stub.ReplenishSlot(other, metadata=s.storefront)
    assert second.outcome == pb.REPLENISH_OUTCOME_ORDER_IN_PROGRESS
    assert second.order.order_id == first.order.order_id
    reused = pb.ReplenishSlotRequest(request_id="buy-1", device_id=device, slot_id="black", quantity=1)
    error = await rpc_error(s.stub.ReplenishSlot(reused, metadata=s.storefront))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and error_reason(error) == "REQUEST_ID_REUSED"
    bad = await rpc_error(
        s.stub.ReplenishSlot(
            pb.ReplenishSlotRequest(request_id="x", device_id=device, slot_id="black", quantity=101),
            metadata=s.storefront,
        )
    )
    assert "quantity" in field_violations(bad)
    missing = await rpc_error(
        s.stub.ReplenishSlot(
            pb.ReplenishSlotRequest(request_id="y", device_id=device, slot_id="cyan"), metadata=s.storefront
        )
    )
    assert missing.code() == grpc.StatusCode.NOT_FOUND and error_reason(missing) == "SLOT_NOT_FOUND"


async def test_concurrent_deciders_create_exactly_one_order(suite, database_url):
    s = await suite(database_url)
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    decisions = await asyncio.gather(
        *(s.decide(device, trigger=pb.ORDER_TRIGGER_DEVICE_REQUEST, explicit=True) for _ in range(20)),
        *(
            s.stub.ReplenishSlot(
                pb.ReplenishSlotRequest(request_id=f"r{i}", device_id=device, slot_id="black"),
                metadata=s.storefront,
            )
            for i in range(10)
        ),
    )
    outcomes = [d.outcome for d in decisions]
    assert outcomes.count(pb.REPLENISH_OUTCOME_ORDER_PLACED) == 1
    ids = {getattr(d, "order_id", "") or d.order.order_id for d in decisions}
    assert len(ids) == 1
    count = await s.db.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(orders)).scalar())
    assert count == 1


async def test_concurrent_copies_of_one_request_get_the_first_answer_and_one_order(suite, database_url):
    """Both explicit paths (a device's Replenish, a customer's ReplenishSlot): copies of one
    request_id from many clients at once all get the answer of the copy that ordered."""
    from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    s = await suite(database_url)
    await s.grant()
    device_id = await s.register("SN-RETRY")
    customer_device = await s.register("SN-BUY")
    address = f"127.0.0.1:{s.service.running.port}"
    channels = [grpc.aio.insecure_channel(address) for _ in range(10)]
    try:
        replenish = device_pb.ReplenishRequest(request_id="again", device_id=device_id, slot_id="black")
        buy = pb.ReplenishSlotRequest(request_id="again", device_id=customer_device, slot_id="black")
        auth = s.device_auth(device_id)
        answers = await asyncio.gather(
            *(
                device_grpc.DeviceServiceStub(channels[i % 10]).Replenish(replenish, metadata=auth)
                for i in range(30)
            ),
            *(
                pb_grpc.ReplenishmentServiceStub(channels[i % 10]).ReplenishSlot(buy, metadata=s.storefront)
                for i in range(30)
            ),
        )
    finally:
        for channel in channels:
            await channel.close()
    device_answers, customer_answers = answers[:30], answers[30:]
    for copies in (device_answers, customer_answers):
        assert len({answer.SerializeToString(deterministic=True) for answer in copies}) == 1
    assert device_answers[0].outcome.outcome == device_pb.REPLENISH_OUTCOME_ORDER_PLACED
    assert customer_answers[0].outcome == pb.REPLENISH_OUTCOME_ORDER_PLACED
    placed = await s.db.read(
        lambda c: c.execute(sa.select(orders.c.device_id, orders.c.order_id, orders.c.request_id)).all()
    )
    assert sorted(placed) == sorted(
        [
            (device_id, device_answers[0].outcome.order_id, "again"),
            (customer_device, customer_answers[0].order.order_id, "again"),
        ]
    )


async def test_a_failure_before_the_reply_is_stored_leaves_no_order(suite, monkeypatch):
    """The decision and the stored reply commit together: a failure in between (here the
    reply cannot be built) leaves neither, and the retry orders once."""
    from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    from services.replenishment import device_api

    s = await suite()
    await s.grant()
    device_id = await s.register("SN-CRASH")
    request = device_pb.ReplenishRequest(request_id="once", device_id=device_id, slot_id="black")
    devices = device_grpc.DeviceServiceStub(s.service.channel)
    auth = s.device_auth(device_id)
    real = device_api.slot_outcome

    def crash(*args: Any) -> Any:
        raise RuntimeError("crashed before the reply was stored")

    monkeypatch.setattr(device_api, "slot_outcome", crash)
    error = await rpc_error(devices.Replenish(request, metadata=auth))
    assert error.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    count = await s.db.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(orders)).scalar())
    assert count == 0
    monkeypatch.setattr(device_api, "slot_outcome", real)
    retried = await devices.Replenish(request, metadata=auth)
    assert retried.outcome.outcome == device_pb.REPLENISH_OUTCOME_ORDER_PLACED
    assert await devices.Replenish(request, metadata=auth) == retried
    count = await s.db.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(orders)).scalar())
    assert count == 1


# -- the order life cycle ----------------------------------------------------------------------


async def _placed_order(s: Suite, device: str, request_id: str = "buy") -> pb.Order:
    placed = await s.stub.ReplenishSlot(
        pb.ReplenishSlotRequest(request_id=request_id, device_id=device, slot_id="black"),
        metadata=s.storefront,
    )
    return placed.order


async def test_a_pending_order_is_placed_when_its_window_closes_and_cancel_is_then_refused(suite):
    s = await suite(replenishment_cancellation_window_seconds=0.3)
    device = await s.register()
    order = await _placed_order(s, device)
    assert order.state == pb.ORDER_STATE_PENDING

    async def placed() -> bool:
        return (await s.order(order.order_id)).state == pb.ORDER_STATE_PLACED

    await until(placed)
    error = await rpc_error(
        s.stub.CancelOrder(
            pb.CancelOrderRequest(order_id=order.order_id, request_id="c"), metadata=s.storefront
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "CANCELLATION_WINDOW_CLOSED" and "PLACED" in error.details()


async def test_cancel_in_the_window_is_idempotent_and_frees_the_slot(suite):
    s = await suite()
    device = await s.register()
    order = await _placed_order(s, device)
    cancel = pb.CancelOrderRequest(order_id=order.order_id, request_id="c-1", note="bought one in a shop")
    first = await s.stub.CancelOrder(cancel, metadata=s.storefront)
    assert first.order.state == pb.ORDER_STATE_CANCELLED
    assert first.order.cancellation_reason == pb.CANCELLATION_REASON_CUSTOMER_REQUEST
    assert first.order.cancellation_note == "bought one in a shop"
    assert await s.stub.CancelOrder(cancel, metadata=s.storefront) == first
    reused = pb.CancelOrderRequest(order_id=order.order_id, request_id="c-1", note="other")
    error = await rpc_error(s.stub.CancelOrder(reused, metadata=s.storefront))
    assert error_reason(error) == "REQUEST_ID_REUSED"
    missing = await rpc_error(
        s.stub.CancelOrder(pb.CancelOrderRequest(order_id=order.order_id), metadata=s.storefront)
    )
    assert "request_id" in field_violations(missing)
    # The slot may order again.
    assert (await _placed_order(s, device, "buy-again")).order_id != order.order_id
    assert ("ORDER_CANCELLED", "") in await s.slot_feed(device)


async def test_ship_deliver_reject_and_illegal_transitions(suite, database_url):
    s = await suite(database_url, replenishment_cancellation_window_seconds=0)
    device = await s.register()
    # UpdateSlot's expected_stock_after_delivery (rp-devices' path): 0 would mean capacity.
    await s.db.write(
        lambda c: c.execute(
            slots.update().where(slots.c.device_id == device).values(expected_stock_after_delivery=90.0)
        )
    )
    order = await _placed_order(s, device)
    await until(lambda: _state_is(s, order.order_id, pb.ORDER_STATE_PLACED))
    tracking = pb.ShipmentTracking(carrier="dhl", tracking_number="123", tracking_url="https://t.example/123")
    shipped = await s.stub.ShipOrder(
        pb.ShipOrderRequest(request_id="s1", order_id=order.order_id, tracking=tracking),
        metadata=s.fulfilment,
    )
    assert shipped.order.state == pb.ORDER_STATE_SHIPPED and shipped.order.tracking.carrier == "dhl"
    no_tracking = await rpc_error(
        s.stub.ShipOrder(pb.ShipOrderRequest(request_id="s2", order_id=order.order_id), metadata=s.fulfilment)
    )
    assert {"tracking.carrier", "tracking.tracking_number"} <= set(field_violations(no_tracking))
    future = timestamp_pb2.Timestamp()
    future.FromMicroseconds(now_micros() + HOUR_US)
    too_late = await rpc_error(
        s.stub.DeliverOrder(
            pb.DeliverOrderRequest(request_id="d0", order_id=order.order_id, event_time=future),
            metadata=s.fulfilment,
        )
    )
    assert "event_time" in field_violations(too_late)
    delivered = await s.stub.DeliverOrder(
        pb.DeliverOrderRequest(request_id="d1", order_id=order.order_id), metadata=s.fulfilment
    )
    assert delivered.order.state == pb.ORDER_STATE_DELIVERED
    # Delivered again: unchanged. Rejected now: illegal, with the current state.
    again = await s.stub.DeliverOrder(pb.DeliverOrderRequest(order_id=order.order_id), metadata=s.fulfilment)
    assert again.order == delivered.order
    error = await rpc_error(
        s.stub.RejectOrder(
            pb.RejectOrderRequest(order_id=order.order_id, reason=pb.REJECTION_REASON_OUT_OF_STOCK),
            metadata=s.fulfilment,
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(error) == "INVALID_ORDER_TRANSITION" and "DELIVERED" in error.details()
    # The slot's expected stock is restored: a new epoch at the delivered level.
    slot = await s.db.read(lambda c: c.execute(sa.select(slots).where(slots.c.device_id == device)).one())
    assert slot.level == 90.0 and slot.level_source == "DELIVERY" and slot.epoch == 1
    forecast = await s.stub.GetSlotForecast(
        pb.GetSlotForecastRequest(device_id=device, slot_id="black"), metadata=s.storefront
    )
    assert forecast.forecast.current_level == 90.0
    feed = await s.slot_feed(device)
    assert ("ORDER_SHIPPED", "") in feed and ("ORDER_DELIVERED", "") in feed and ("REFILLED", "") in feed
    # A pending order is not fulfilment's yet; a rejected one is final and frees the slot.
    pending_device = await s.register("SN-2")
    second = await _placed_order(s, pending_device, "buy-2")
    await until(lambda: _state_is(s, second.order_id, pb.ORDER_STATE_PLACED))
    rejected = await s.stub.RejectOrder(
        pb.RejectOrderRequest(
            order_id=second.order_id, reason=pb.REJECTION_REASON_UNDELIVERABLE, note="no such street"
        ),
        metadata=s.fulfilment,
    )
    assert (
        rejected.order.state == pb.ORDER_STATE_REJECTED and rejected.order.rejection_note == "no such street"
    )
    unspecified = await rpc_error(
        s.stub.RejectOrder(pb.RejectOrderRequest(order_id=second.order_id), metadata=s.fulfilment)
    )
    assert "reason" in field_violations(unspecified)
    ship_rejected = await rpc_error(
        s.stub.ShipOrder(
            pb.ShipOrderRequest(order_id=second.order_id, tracking=tracking), metadata=s.fulfilment
        )
    )
    assert error_reason(ship_rejected) == "INVALID_ORDER_TRANSITION"


async def _state_is(s: Suite, order_id: str, state: int) -> bool:
    return (await s.order(order_id)).state == state


async def test_a_pending_order_cannot_be_shipped(suite):
    s = await suite()
    device = await s.register()
    order = await _placed_order(s, device)
    error = await rpc_error(
        s.stub.ShipOrder(
            pb.ShipOrderRequest(
                order_id=order.order_id, tracking=pb.ShipmentTracking(carrier="dhl", tracking_number="1")
            ),
            metadata=s.fulfilment,
        )
    )
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION
        and error_reason(error) == "INVALID_ORDER_TRANSITION"
    )
    metadata = dict(error.trailing_metadata() or ())
    assert "PENDING" in error.details(), metadata


# -- consent ------------------------------------------------------------------------------------


async def test_a_withdrawal_cancels_pending_automatic_orders_at_once(suite, database_url):
    s = await suite(database_url, replenishment_promotion_interval_seconds=3600)  # only the consent hook
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    decision = await s.decide(device)
    customer_order = await _placed_order(s, await s.register("SN-2"), "buy-2")
    started = time.monotonic()
    await s.withdraw()
    await until(lambda: _state_is(s, decision.order_id, pb.ORDER_STATE_CANCELLED), timeout=5)
    elapsed = time.monotonic() - started
    order = await s.order(decision.order_id)
    assert order.cancellation_reason == pb.CANCELLATION_REASON_CONSENT_WITHDRAWN
    assert ("ORDER_CANCELLED", "") in await s.slot_feed(device)
    # The customer's own order is no automatic order: it stays.
    assert (await s.order(customer_order.order_id)).state == pb.ORDER_STATE_PENDING
    # And the device is told CONSENT_REQUIRED.
    assert (await s.decide(device)).outcome == pb.REPLENISH_OUTCOME_CONSENT_REQUIRED
    print(f"withdrawal to cancellation: {elapsed * 1000:.0f} ms")


async def test_a_stale_consent_state_fails_closed(suite):
    s = await suite(consent_max_staleness_seconds=1.5, replenishment_cancellation_window_seconds=0.2)
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    order = await _placed_order(s, await s.register("SN-2", policy=pb.SLOT_POLICY_AUTO), "b")
    automatic = await s.decide(device)
    await s.db.write(
        lambda c: c.execute(
            orders.update().where(orders.c.order_id == automatic.order_id).values(state="CANCELLED")
        )
    )
    await s.consent_service.running.stop(0)  # consent goes away; the cache ages past its bound
    await until(lambda: s.ordering.consent.staleness > 1.5)
    stale = await s.decide(device)
    assert stale.outcome == pb.REPLENISH_OUTCOME_CONSENT_REQUIRED and "cannot be confirmed" in stale.reason
    with pytest.raises(Exception) as caught:
        await s.decide(device, trigger=pb.ORDER_TRIGGER_DEVICE_REQUEST, explicit=True)
    assert getattr(caught.value, "reason", "") == "CONSENT_STATE_STALE"
    # The customer's explicit order is still placed when its window closes.
    await until(lambda: _state_is(s, order.order_id, pb.ORDER_STATE_PLACED))
    count = await s.db.read(
        lambda c: c.execute(
            sa.select(sa.func.count()).select_from(orders).where(orders.c.state != "CANCELLED")
        ).scalar()
    )
    assert count == 1


async def test_pending_automatic_orders_wait_for_a_fresh_consent_state_before_being_placed(suite):
    # The cache hears a heartbeat every second: a bound of 1.5 s is passed only once consent is gone.
    s = await suite(consent_max_staleness_seconds=1.5, replenishment_cancellation_window_seconds=2.5)
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    decision = await s.decide(device)
    await s.consent_service.running.stop(0)
    order = await s.order(decision.order_id)
    await until(lambda: s.ordering.consent.staleness > 1.5)
    assert now_micros() < order.cancel_deadline_time.ToMicroseconds(), "stale only after the window closed"
    await until(lambda: now_micros() > order.cancel_deadline_time.ToMicroseconds() + 500_000)
    # Past the window, several worker passes later (interval 0.1 s): still PENDING.
    assert (await s.order(decision.order_id)).state == pb.ORDER_STATE_PENDING


# -- promotion across a restart ------------------------------------------------------------------


async def test_promotion_survives_a_restart(start_service, dev_tokens, database_url, tmp_path):
    consent = await start_service("consent", database_url if database_url.startswith("postgresql") else None)
    settings = dict(
        consent_address=f"127.0.0.1:{consent.running.port}",
        service_token=dev_tokens["service:replenishment"],
        replenishment_cancellation_window_seconds=1.0,  # the first service's start pass is long over by then
        replenishment_promotion_interval_seconds=3600,  # no pass but the first, at start
    )
    first = await start_service("replenishment", database_url, **settings)
    s = Suite(first, consent)
    device = await s.register()
    order = await _placed_order(s, device)
    await first.running.stop(0)
    # The window closes while the service is down (its worker's only pass was at its start).
    deadline_us = order.cancel_deadline_time.ToMicroseconds()
    await until(lambda: now_micros() > deadline_us)
    pending = Database(database_url, "replenishment")
    try:
        state = pending.transaction(
            lambda c: c.execute(sa.select(orders.c.state).where(orders.c.order_id == order.order_id)).scalar()
        )
    finally:
        pending.close()
    assert state == "PENDING"
    second = await start_service("replenishment", database_url, **settings)
    s2 = Suite(second, consent)
    await until(lambda: _state_is(s2, order.order_id, pb.ORDER_STATE_PLACED))
    events = await s2.stub.ListOrderEvents(pb.ListOrderEventsRequest(), metadata=s2.fulfilment)
    assert [(e.type, e.previous_state) for e in events.events] == [
        (pb.ORDER_EVENT_TYPE_CREATED, pb.ORDER_STATE_UNSPECIFIED),
        (pb.ORDER_EVENT_TYPE_STATE_CHANGED, pb.ORDER_STATE_PENDING),
    ]
    # Two promoters (a restart racing a replica) place it once: the UPDATE is conditional.
    worker_result = await second.running.app.registrations[0].servicer.orders.ordering.db.write(
        lambda c: __import__("services.replenishment.orders", fromlist=["x"]).promote(
            c, c.execute(sa.select(orders)).one(), now_micros()
        )
    )
    assert worker_result is None


# -- the order feed ---------------------------------------------------------------------------


async def test_order_feed_pages_and_watch_with_heartbeats(suite):
    s = await suite()
    device_ids = [await s.register(f"SN-{i}") for i in range(3)]
    for i, device in enumerate(device_ids):
        await _placed_order(s, device, f"b{i}")
    page = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(page_size=2), metadata=s.fulfilment)
    assert [e.revision for e in page.events] == [1, 2] and page.next_page_token
    rest = await s.stub.ListOrderEvents(
        pb.ListOrderEventsRequest(page_size=2, page_token=page.next_page_token), metadata=s.fulfilment
    )
    assert [e.revision for e in rest.events] == [3] and not rest.next_page_token
    bad = await rpc_error(
        s.stub.ListOrderEvents(
            pb.ListOrderEventsRequest(page_size=2, since_revision=1, page_token=page.next_page_token),
            metadata=s.fulfilment,
        )
    )
    assert error_reason(bad) == "INVALID_PAGE_TOKEN"
    ahead = await rpc_error(
        s.stub.ListOrderEvents(pb.ListOrderEventsRequest(since_revision=99), metadata=s.fulfilment)
    )
    assert ahead.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(ahead) == "REVISION_AHEAD"
    listed = await s.stub.ListOrders(pb.ListOrdersRequest(page_size=2), metadata=s.fulfilment)
    assert len(listed.orders) == 2 and listed.revision == 3
    more = await s.stub.ListOrders(
        pb.ListOrdersRequest(page_size=2, page_token=listed.next_page_token), metadata=s.fulfilment
    )
    assert len(more.orders) == 1 and more.revision == 3
    unfiltered = await rpc_error(s.stub.ListOrders(pb.ListOrdersRequest(), metadata=s.storefront))
    assert error_reason(unfiltered) == "FILTER_REQUIRED"

    stream = s.stub.WatchOrderEvents(
        pb.WatchOrderEventsRequest(since_revision=1, heartbeat_interval=duration_pb2.Duration(seconds=1)),
        metadata=s.fulfilment,
    )
    seen: list[Any] = []
    async for message in stream:
        seen.append(message)
        if message.HasField("heartbeat"):
            break
    assert [m.event.revision for m in seen[:-1]] == [2, 3] and seen[-1].heartbeat.current_revision == 3
    cancelled = await s.stub.CancelOrder(
        pb.CancelOrderRequest(order_id=seen[0].event.order.order_id, request_id="c"), metadata=s.storefront
    )
    live = await anext(aiter(stream))
    assert live.event.revision == 4 and live.event.order == cancelled.order
    assert live.event.previous_state == pb.ORDER_STATE_PENDING
    started = time.monotonic()
    beat = await anext(aiter(stream))
    assert beat.heartbeat.current_revision == 4 and 0.5 < time.monotonic() - started < 3
    stream.cancel()


# -- data-subject requests ---------------------------------------------------------------------


async def test_erasure_keeps_orders_pseudonymised_and_export_lists_them(suite, database_url):
    from najimi.privacy.v1 import data_subject_service_pb2 as privacy_pb
    from najimi.privacy.v1 import data_subject_service_pb2_grpc as privacy_grpc

    s = await suite(database_url, replenishment_cancellation_window_seconds=0)
    device = await s.register()
    placed = await _placed_order(s, device)
    await until(lambda: _state_is(s, placed.order_id, pb.ORDER_STATE_PLACED))
    pending_device = await s.register("SN-2")
    s.ordering.window_us = DAY_US  # the second order stays PENDING
    pending = await _placed_order(s, pending_device, "b2")
    privacy = privacy_grpc.DataSubjectServiceStub(s.service.channel)
    consent = s.service.auth("service:consent")
    exported = await privacy.ExportCustomerData(
        privacy_pb.ExportCustomerDataRequest(customer_id=CUSTOMER, request_id="x1"), metadata=consent
    )
    listed = json_format.MessageToDict(exported.document)["held"]["orders"]
    assert {o["order_id"] for o in listed} == {placed.order_id, pending.order_id}
    erased = await privacy.EraseCustomerData(
        privacy_pb.EraseCustomerDataRequest(customer_id=CUSTOMER, request_id="e1"), metadata=consent
    )
    assert (
        erased.erased_records["orders_cancelled"] == 1 and erased.erased_records["orders_pseudonymised"] == 2
    )
    pseudonym = "erased:" + s.servicer.store.idempotency.pseudonym(CUSTOMER)
    kept = await s.order(placed.order_id)
    assert kept.customer_id == pseudonym and kept.state == pb.ORDER_STATE_PLACED
    cancelled = await s.order(pending.order_id)
    assert cancelled.state == pb.ORDER_STATE_CANCELLED
    assert cancelled.cancellation_reason == pb.CANCELLATION_REASON_CUSTOMER_ERASED
    events = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(), metadata=s.admin)
    assert events.events and all(e.order.customer_id == pseudonym for e in events.events)

    def cells(connection: sa.Connection) -> list[Any]:
        found = []
        for table in (orders, order_events_table):
            for row in connection.execute(sa.select(table)):
                found.extend(row)
        return found

    assert not [
        c
        for c in await s.db.read(cells)
        if CUSTOMER.encode() in (c if isinstance(c, bytes) else str(c).encode())
    ]


async def test_slot_and_device_changes_cancel_pending_orders(suite):
    s = await suite()
    await s.grant()
    device = await s.register()
    await s.readings(device, LOW)
    automatic = await s.decide(device)
    mask = field_mask_pb2.FieldMask(paths=["policy"])
    updated = await s.stub.UpdateSlot(
        pb.UpdateSlotRequest(
            slot=pb.Slot(device_id=device, slot_id="black", policy=pb.SLOT_POLICY_NOTIFY_ONLY),
            update_mask=mask,
        ),
        metadata=s.storefront,
    )
    assert updated.cancelled_order_id == automatic.order_id
    assert (await s.order(automatic.order_id)).cancellation_reason == pb.CANCELLATION_REASON_POLICY_CHANGED
    # The customer's own order survives a policy change, not a deletion of its slot.
    bought = await _placed_order(s, device, "b1")
    await s.stub.UpdateSlot(
        pb.UpdateSlotRequest(
            slot=pb.Slot(device_id=device, slot_id="black", policy=pb.SLOT_POLICY_OFF), update_mask=mask
        ),
        metadata=s.storefront,
    )
    assert (await s.order(bought.order_id)).state == pb.ORDER_STATE_PENDING
    deleted = await s.stub.DeleteSlot(
        pb.DeleteSlotRequest(device_id=device, slot_id="black"), metadata=s.storefront
    )
    assert deleted.cancelled_order_id == bought.order_id
    assert (await s.order(bought.order_id)).cancellation_reason == pb.CANCELLATION_REASON_SLOT_DELETED
    other = await s.register("SN-2")
    pending = await _placed_order(s, other, "b2")
    retired = await s.stub.DeregisterDevice(
        pb.DeregisterDeviceRequest(device_id=other), metadata=s.storefront
    )
    assert list(retired.cancelled_order_ids) == [pending.order_id]
    assert (await s.order(pending.order_id)).cancellation_reason == pb.CANCELLATION_REASON_DEVICE_DEREGISTERED
    again = await s.stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=other), metadata=s.storefront)
    assert list(again.cancelled_order_ids) == []


async def test_watchers_see_this_replicas_events_at_once_not_at_the_next_poll(suite, monkeypatch):
    """With the cross-replica poll an hour apart and heartbeats a minute apart, only the wake
    after this replica's commits can deliver: telemetry, pause, and an order, on both feeds."""
    from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    from services.replenishment import feed_follower

    monkeypatch.setattr(feed_follower, "POLL_SECONDS", 3600.0)
    s = await suite()
    device = await s.register()
    minute = duration_pb2.Duration(seconds=60)
    slot_stream = aiter(
        s.stub.WatchSlotEvents(
            pb.WatchSlotEventsRequest(device_id=device, heartbeat_interval=minute), metadata=s.storefront
        )
    )
    order_stream = aiter(
        s.stub.WatchOrderEvents(pb.WatchOrderEventsRequest(heartbeat_interval=minute), metadata=s.fulfilment)
    )

    async def next_of(stream: Any, kind: str) -> Any:
        """The next message of this kind (within 5 seconds, far below the poll and heartbeats)."""
        while True:
            message = await asyncio.wait_for(anext(stream), 5)
            if message.WhichOneof("kind") == kind:
                return message

    await next_of(slot_stream, "heartbeat")  # the replay (DEVICE_REGISTERED) is done
    await next_of(order_stream, "heartbeat")
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(now_micros())
    await device_grpc.DeviceServiceStub(s.service.channel).ReportTelemetry(
        device_pb.ReportTelemetryRequest(
            device_id=device,
            readings=[device_pb.Reading(reading_id="low", slot_id="black", level=5.0, measure_time=stamp)],
        ),
        metadata=s.device_auth(device),
    )
    assert (await next_of(slot_stream, "event")).event.type == pb.SLOT_EVENT_TYPE_LOW
    await s.stub.PauseSlot(pb.PauseSlotRequest(device_id=device, slot_id="black"), metadata=s.storefront)
    seen = await next_of(slot_stream, "event")
    while seen.event.type != pb.SLOT_EVENT_TYPE_PAUSED:  # after the decision's ORDER_SKIPPED
        seen = await next_of(slot_stream, "event")
    order = await _placed_order(s, device)
    created = await next_of(order_stream, "event")
    assert created.event.order.order_id == order.order_id
    placed = await next_of(slot_stream, "event")
    assert (placed.event.type, placed.event.order_id) == (pb.SLOT_EVENT_TYPE_ORDER_PLACED, order.order_id)


async def test_order_events_past_their_retention_are_purged_and_older_positions_are_compacted(suite):
    from services.replenishment import order_feed

    s = await suite()
    for i in range(3):
        await _placed_order(s, await s.register(f"SN-{i}"), f"b{i}")
    # Events 1 and 2 were created two days ago (as if); a purge at a retention of a day takes them.
    await s.db.write(
        lambda c: c.execute(
            order_events_table.update()
            .where(order_events_table.c.revision <= 2)
            .values(create_time_us=now_micros() - 2 * DAY_US)
        )
    )
    assert await s.db.write(lambda c: order_feed.purge_before(c, now_micros() - DAY_US)) == 2
    listed = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(), metadata=s.fulfilment)
    assert [e.revision for e in listed.events] == [3]  # 0: from the oldest retained event
    resumed = await s.stub.ListOrderEvents(pb.ListOrderEventsRequest(since_revision=2), metadata=s.fulfilment)
    assert [e.revision for e in resumed.events] == [3]
    error = await rpc_error(
        s.stub.ListOrderEvents(pb.ListOrderEventsRequest(since_revision=1), metadata=s.fulfilment)
    )
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE and error_reason(error) == "REVISION_COMPACTED"
    stream = s.stub.WatchOrderEvents(pb.WatchOrderEventsRequest(since_revision=1), metadata=s.fulfilment)
    error = await rpc_error(anext(aiter(stream)))
    assert error_reason(error) == "REVISION_COMPACTED"


async def test_a_device_is_told_consent_required_and_replenish_fails_closed_when_stale(suite):
    from najimi.replenishment.device.v1 import device_service_pb2 as device_pb
    from najimi.replenishment.device.v1 import device_service_pb2_grpc as device_grpc

    s = await suite(consent_max_staleness_seconds=1.5)
    await s.grant()
    device_id = await s.register("SN-DEV", unit_price_micros=1_000_000)
    devices = device_grpc.DeviceServiceStub(s.service.channel)
    auth = s.device_auth(device_id)
    await s.withdraw()

    def replenish(request_id: str) -> Any:
        return devices.Replenish(
            device_pb.ReplenishRequest(request_id=request_id, device_id=device_id, slot_id="black"),
            metadata=auth,
        )

    withdrawn = await replenish("r1")
    assert withdrawn.outcome.outcome == device_pb.REPLENISH_OUTCOME_CONSENT_REQUIRED
    await s.consent_service.running.stop(0)
    await until(lambda: s.ordering.consent.staleness > 1.5)
    error = await rpc_error(replenish("r2"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "CONSENT_STATE_STALE"
    # Telemetry is still accepted (and durable); the slot's outcome is CONSENT_REQUIRED for now.
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(now_micros())
    reported = await devices.ReportTelemetry(
        device_pb.ReportTelemetryRequest(
            device_id=device_id,
            readings=[device_pb.Reading(reading_id="x1", slot_id="black", level=5.0, measure_time=stamp)],
        ),
        metadata=auth,
    )
    assert reported.results[0].status == device_pb.READING_STATUS_ACCEPTED
    assert reported.slot_outcomes[0].outcome == device_pb.REPLENISH_OUTCOME_CONSENT_REQUIRED
    count = await s.db.read(lambda c: c.execute(sa.select(sa.func.count()).select_from(orders)).scalar())
    assert count == 0


async def test_replenish_slot_needs_a_price_and_an_active_device(suite):
    s = await suite()
    unpriced = await s.register(
        "SN-free", policy=pb.SLOT_POLICY_NOTIFY_ONLY, unit_price_micros=0, currency_code=""
    )
    error = await rpc_error(
        s.stub.ReplenishSlot(
            pb.ReplenishSlotRequest(request_id="p", device_id=unpriced, slot_id="black"),
            metadata=s.storefront,
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "PRICE_UNKNOWN"
    retired = await s.register("SN-old")
    await s.stub.DeregisterDevice(pb.DeregisterDeviceRequest(device_id=retired), metadata=s.storefront)
    error = await rpc_error(
        s.stub.ReplenishSlot(
            pb.ReplenishSlotRequest(request_id="q", device_id=retired, slot_id="black"), metadata=s.storefront
        )
    )
    assert (
        error.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(error) == "DEVICE_DEREGISTERED"
    )
    unknown = await rpc_error(
        s.stub.ReplenishSlot(
            pb.ReplenishSlotRequest(request_id="r", device_id="dev_nope", slot_id="black"),
            metadata=s.storefront,
        )
    )
    assert unknown.code() == grpc.StatusCode.NOT_FOUND and error_reason(unknown) == "DEVICE_NOT_FOUND"


# -- stopping the order worker --------------------------------------------------------------------


async def test_a_worker_woken_as_it_is_stopped_still_stops(suite):
    """A wake-up landing in the same loop iteration as stop()'s cancel must not swallow the
    cancel (asyncio.wait_for does on 3.11), or stop() waits for the next pass, an hour away."""
    s = await suite()
    worker = OrderWorker(s.db, s.ordering, interval_seconds=3600)
    passes: list[dict[str, int]] = []
    run_once = worker.run_once

    async def counted() -> dict[str, int]:
        result = await run_once()
        passes.append(result)  # the loop goes on to wait in the same step
        return result

    worker.run_once = counted  # type: ignore[method-assign]
    worker.start()
    await until(lambda: passes)
    worker.wake()
    await asyncio.wait_for(worker.stop(), 5)
    assert len(passes) == 1
