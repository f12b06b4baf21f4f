"""Wires the consent service together: settings -> store -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.consent.v1 import consent_service_pb2, consent_service_pb2_grpc

from services.consent.servicer import ACCESS, ConsentServicer
from services.consent.store import ConsentStore
from shared.data_subject import unimplemented_data_subject_registration
from shared.db import Database
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: Settings) -> App:
    database = Database(settings.effective_database_url, "consent", MIGRATIONS)
    store = ConsentStore(database)

    async def start() -> None:
        await asyncio.to_thread(database.migrate)

    async def stop() -> None:
        database.close()

    return App(
        name="consent",
        registrations=[
            Registration(
                consent_service_pb2.DESCRIPTOR.services_by_name["ConsentService"],
                consent_service_pb2_grpc.add_ConsentServiceServicer_to_server,
                ConsentServicer(store),
                ACCESS,
            ),
            unimplemented_data_subject_registration(),
        ],
        start=start,
        stop=stop,
    )
