"""Wires the replenishment service together: settings -> store -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.replenishment.device.v1 import device_service_pb2, device_service_pb2_grpc
from najimi.replenishment.v1 import replenishment_service_pb2, replenishment_service_pb2_grpc

from services.replenishment.data_subject import ReplenishmentDataSubjectServicer
from services.replenishment.device_api import DeviceServicer
from services.replenishment.devices import device_token_resolver
from services.replenishment.ordering import Ordering
from services.replenishment.servicer import ReplenishmentServicer
from services.replenishment.slot_events import SlotFeed
from services.replenishment.store import ReplenishmentStore
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
    ordering = Ordering()
    slot_feed = SlotFeed(database)
    pages = PageTokens.from_settings(settings).of_service(SERVICES["ReplenishmentService"])

    async def start() -> None:
        await asyncio.to_thread(database.migrate)
        await slot_feed.start()

    async def stop() -> None:
        await slot_feed.stop()
        database.close()

    return App(
        name="replenishment",
        registrations=[
            Registration(
                SERVICES["ReplenishmentService"],
                replenishment_service_pb2_grpc.add_ReplenishmentServiceServicer_to_server,
                ReplenishmentServicer(store, pages, slot_feed),
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
        drain=slot_feed.close_watches,
        # Devices authenticate with the tokens issued at registration (principal device:<id>).
        token_resolvers=[device_token_resolver(store.device_token)],
    )
