"""Wires the consent service together: settings -> keys, store, feed -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.consent.v1 import consent_service_pb2, consent_service_pb2_grpc

from services.consent.feed import ChangeFeed
from services.consent.receipts import ReceiptSigner
from services.consent.servicer import ACCESS, ConsentServicer
from services.consent.store import ConsentStore
from services.consent.vocabulary import Vocabulary
from shared.data_subject import unimplemented_data_subject_registration
from shared.db import Database
from shared.keys import configured_key
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


def audit_key(settings: Settings) -> bytes:
    """The key of the audit log's customer references: configured, or a generated dev key file."""
    return configured_key(
        settings.consent_audit_key.get_secret_value(),
        "NAJIMI_CONSENT_AUDIT_KEY",
        settings.data_dir,
        "consent-audit.key",
    )


def build_app(settings: Settings) -> App:
    database = Database(settings.effective_database_url, "consent", MIGRATIONS)
    store = ConsentStore(database)
    feed = ChangeFeed(database)
    servicer = ConsentServicer(
        store, feed, ReceiptSigner.from_settings(settings), audit_key(settings), Vocabulary({}, {})
    )

    async def start() -> None:
        await asyncio.to_thread(database.migrate)
        await servicer.reload_vocabulary()
        await feed.start()

    async def stop() -> None:
        await feed.stop()
        database.close()

    return App(
        name="consent",
        registrations=[
            Registration(
                consent_service_pb2.DESCRIPTOR.services_by_name["ConsentService"],
                consent_service_pb2_grpc.add_ConsentServiceServicer_to_server,
                servicer,
                ACCESS,
            ),
            unimplemented_data_subject_registration(),
        ],
        start=start,
        stop=stop,
    )
