"""The background work on orders: promotion, consent withdrawal, deferred decisions.

One pass (`run_once`), every NAJIMI_REPLENISHMENT_PROMOTION_INTERVAL_SECONDS, at start
and at once whenever the consent cache applies a change (ConsentCache.on_change):

1. **Withdrawn consent.** Every PENDING AUTOMATIC or DEVICE_REQUEST order whose customer
   no longer grants `replenishment.automatic_ordering` (in a fresh cache) is cancelled,
   reason CONSENT_WITHDRAWN. A stale cache decides nothing.
2. **Promotion.** Every PENDING order whose cancellation window has closed becomes PLACED.
   The state is in the database, so a restart loses nothing: the first pass after start
   promotes everything overdue. Each promotion is a conditional UPDATE ... WHERE
   state = 'PENDING' (orders.promote): two replicas, or a cancel racing the worker,
   never both win, so no order is placed twice. An order that needs consent is promoted
   only while the consent is known to be granted: with a stale cache it stays PENDING
   (fail closed) until the state is known, and is then placed or cancelled.
3. **Deferred decisions.** Slots whose last decision was CONSENT_REQUIRED are decided
   again (trigger AUTOMATIC) once their customer's consent is fresh and granted, so a
   device need not report again for its order.
4. **Retention.** Order events older than NAJIMI_REPLENISHMENT_ORDER_EVENTS_RETENTION_DAYS
   are deleted (at most once a minute); a watcher resuming from before them gets
   OUT_OF_RANGE REVISION_COMPACTED and resynchronises with ListOrders.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable

import sqlalchemy as sa
from najimi.replenishment.v1 import replenishment_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.replenishment import order_feed, orders, slot_events
from services.replenishment.ordering import Consent, Ordering
from services.replenishment.store import devices, slots
from shared.db import Database
from shared.log import get_logger
from shared.tasks import cancel_and_wait

BATCH = 200
PURGE_INTERVAL_US = 60 * 1_000_000
log = get_logger("najimi.replenishment.order_worker")


class OrderWorker:
    def __init__(
        self,
        database: Database,
        ordering: Ordering,
        interval_seconds: float,
        on_change: Callable[[], object] | None = None,
        retention_seconds: float = 30 * 86_400,
    ):
        self.db = database
        self.ordering = ordering
        self.interval = interval_seconds
        self.retention_us = round(retention_seconds * 1_000_000)
        self._next_purge_us = 0
        self._consent_mark: tuple[int, bool] = (-1, False)  # (revision, fresh) at the last sweep
        self.on_change = on_change  # awaited after a pass changed orders (wakes feed watchers)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.run_once()
            except Exception as error:  # a database hiccup must not end the worker
                log.warning("order_worker_failed", error=type(error).__name__, detail=str(error)[:200])
            with contextlib.suppress(TimeoutError):
                # Not asyncio.wait_for: on 3.11 a cancel arriving as the wake-up completes is
                # swallowed (gh-86296) and stop() would wait for this loop for ever.
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()

    async def run_once(self) -> dict[str, int]:
        """One pass; returns how many orders it cancelled and placed and slots it decided."""
        # The consent sweeps run when the consent state moved (a change, or fresh again after
        # being stale), not every pass: they read every pending order and deferred slot.
        consent = self.ordering.consent
        mark = (consent.revision, consent.staleness <= self.ordering.max_staleness)
        sweep = mark[1] and mark != self._consent_mark
        cancelled = await self.db.write(self._cancel_withdrawn) if sweep else 0
        placed = 0
        while True:
            batch_placed, more = await self.db.write(self._promote_batch)
            placed += batch_placed
            if not more:
                break
        decided = await self._decide_deferred() if sweep else 0
        if sweep:
            self._consent_mark = mark
        await self._purge()
        if (cancelled or placed or decided) and self.on_change is not None:
            await self.on_change()  # type: ignore[misc]
        if cancelled or placed:
            log.info("orders_advanced", cancelled=cancelled, placed=placed, decided=decided)
        return {"cancelled": cancelled, "placed": placed, "decided": decided}

    async def _purge(self) -> None:
        """Order events older than the retention go, at most once every PURGE_INTERVAL_US."""
        now = self.ordering.clock()
        if now < self._next_purge_us:
            return
        self._next_purge_us = now + PURGE_INTERVAL_US
        while (
            await self.db.write(lambda c: order_feed.purge_before(c, now - self.retention_us))
            == order_feed.PAGE
        ):
            pass
        # The slot feed keeps its events as long (the proto's promise).
        while (
            await self.db.write(lambda c: slot_events.purge_before(c, now - self.retention_us))
            == slot_events.PAGE
        ):
            pass

    def _cancel_withdrawn(self, connection: Connection) -> int:
        now = self.ordering.clock()
        cancelled = 0
        for row in orders.pending_consented(connection):
            if self.ordering.consent_of(row.customer_id) is Consent.DENIED:
                if orders.cancel(connection, row, "CONSENT_WITHDRAWN", now) is not None:
                    cancelled += 1
        return cancelled

    def _promote_batch(self, connection: Connection) -> tuple[int, bool]:
        now = self.ordering.clock()
        due = orders.due_for_promotion(connection, now, BATCH)
        placed = 0
        for row in due:
            if row.order_trigger in orders.CONSENTED_TRIGGERS:
                consent = self.ordering.consent_of(row.customer_id)
                if consent is Consent.DENIED:
                    orders.cancel(connection, row, "CONSENT_WITHDRAWN", now)
                    continue
                if consent is Consent.STALE:
                    continue  # fail closed: stays PENDING until the consent state is known
            if orders.promote(connection, row, now) is not None:
                placed += 1
        # Another batch only if this one was full and made progress (stale ones stay behind).
        return placed, len(due) == BATCH and placed > 0

    async def _decide_deferred(self) -> int:
        """Decides again every deferred slot whose customer's consent is now granted."""

        def deferred(connection: Connection, after: tuple[str, str]) -> list[sa.Row]:
            return list(
                connection.execute(
                    sa.select(slots.c.device_id, slots.c.slot_id, devices.c.customer_id)
                    .join(devices, devices.c.device_id == slots.c.device_id)
                    .where(
                        slots.c.decision_due_time_us.is_not(None),
                        devices.c.state == "ACTIVE",
                        sa.tuple_(slots.c.device_id, slots.c.slot_id) > sa.tuple_(*after),
                    )
                    .order_by(slots.c.device_id, slots.c.slot_id)
                    .limit(BATCH)
                ).all()
            )

        decided = 0
        after = ("", "")
        while True:
            page = await self.db.read(functools.partial(deferred, after=after))
            for row in page:
                if self.ordering.consent_of(row.customer_id) is not Consent.GRANTED:
                    continue
                try:
                    await self.ordering.consider(
                        row.device_id, row.slot_id, trigger=pb.ORDER_TRIGGER_AUTOMATIC
                    )
                except Exception as error:  # e.g. the slot was deleted meanwhile
                    log.warning(
                        "deferred_decision_failed", device_id=row.device_id, error=type(error).__name__
                    )
                    continue
                decided += 1
            if len(page) < BATCH:
                return decided
            after = (page[-1].device_id, page[-1].slot_id)
