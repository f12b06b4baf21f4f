"""Wires the replenishment service together: settings -> store -> ordering -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.replenishment.device.v1 import device_service_pb2, device_service_pb2_grpc
from najimi.replenishment.v1 import replenishment_service_pb2, replenishment_service_pb2_grpc

from services.replenishment.data_subject import ReplenishmentDataSubjectServicer
from services.replenishment.device_api import DeviceServicer
from services.replenishment.devices import device_token_resolver
from services.replenishment.order_feed import OrderFeed
from services.replenishment.order_rpcs import OrderDesk
from services.replenishment.order_worker import OrderWorker
from services.replenishment.ordering import PURPOSE, Ordering
from services.replenishment.servicer import ReplenishmentServicer
from services.replenishment.slot_events import SlotFeed
from services.replenishment.store import ReplenishmentStore
from shared.clients import channel_credentials
from shared.consent_cache import ConsentCache
from shared.data_subject import data_subject_registration
from shared.db import Database
from shared.idempotency import Idempotency
from shared.page_tokens import PageTokens
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
SERVICES = replenishment_service_pb2.DESCRIPTOR.services_by_name


def build_app(settings: Settings) -> App:
    database = Database(settings.effective_database_url, "replenishment", MIGRATIONS)
    store = ReplenishmentStore(database, Idempotency.from_settings(settings))
    # The automatic-ordering consent this service obeys: a local cache of consent's change feed.
    consent = ConsentCache(
        settings.consent_address,
        settings.service_token,
        purposes=[PURPOSE],
        credentials=channel_credentials(settings),
    )
    ordering = Ordering(
        database,
        consent,
        cancellation_window_seconds=settings.replenishment_cancellation_window_seconds,
        max_consent_staleness_seconds=settings.consent_max_staleness_seconds,
    )
    slot_feed = SlotFeed(database)
    feed = OrderFeed(database, slot_feed)
    # Every decision committed wakes the watchers of both feeds (it may have written to both).
    ordering.on_commit = feed.notify
    worker = OrderWorker(
        database,
        ordering,
        settings.replenishment_promotion_interval_seconds,
        on_change=feed.notify,
        retention_seconds=settings.replenishment_order_events_retention_days * 86_400,
    )
    # A withdrawal (or a grant) is acted on as soon as the cache applies it.
    consent.on_change(worker.wake)
    pages = PageTokens.from_settings(settings).of_service(SERVICES["ReplenishmentService"])
    servicer = ReplenishmentServicer(store, pages, slot_feed, OrderDesk(ordering, feed, pages))

    async def start() -> None:
        await asyncio.to_thread(database.migrate)
        await slot_feed.start()
        await feed.start()
        # Followed in the background: until it is fresh, ordering fails closed.
        consent.start()
        # Its first pass places every order whose window closed while the service was down.
        worker.start()

    async def stop() -> None:
        await worker.stop()
        await consent.stop()
        await feed.stop()
        await slot_feed.stop()
        database.close()

    async def drain() -> None:
        await slot_feed.close_watches()
        await feed.close_watches()

    return App(
        name="replenishment",
        registrations=[
            Registration(
                SERVICES["ReplenishmentService"],
                replenishment_service_pb2_grpc.add_ReplenishmentServiceServicer_to_server,
                servicer,
            ),
            Registration(
                device_service_pb2.DESCRIPTOR.services_by_name["DeviceService"],
                device_service_pb2_grpc.add_DeviceServiceServicer_to_server,
                DeviceServicer(store, ordering, settings.replenishment_telemetry_readings_per_second),
            ),
            data_subject_registration(ReplenishmentDataSubjectServicer(store)),
        ],
        start=start,
        stop=stop,
        # Watches end when the server begins to stop, so followers reconnect elsewhere.
        drain=drain,
        # Devices authenticate with the tokens issued at registration (principal device:<id>).
        token_resolvers=[device_token_resolver(store.device_token)],
    )
