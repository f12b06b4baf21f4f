"""Wires the consent service together: settings -> keys, store, feed -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.consent.v1 import consent_service_pb2, consent_service_pb2_grpc

from services.consent.audit import audit_key
from services.consent.data_subject import ConsentDataSubjectServicer
from services.consent.expiry import ExpiryPublisher
from services.consent.feed import ChangeFeed
from services.consent.receipts import ReceiptSigner
from services.consent.servicer import ConsentServicer
from services.consent.store import ConsentStore
from services.consent.subject_requests import DataSubjectRequests
from services.consent.vocabulary import Vocabulary
from shared.data_subject import data_subject_registration
from shared.db import Database
from shared.idempotency import Idempotency
from shared.page_tokens import PageTokens
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: Settings) -> App:
    database = Database(settings.effective_database_url, "consent", MIGRATIONS)
    store = ConsentStore(database)
    feed = ChangeFeed(database)
    ref_key = audit_key(settings)
    idempotency = Idempotency.from_settings(settings)
    requests = DataSubjectRequests(database, feed, settings, ref_key, idempotency)
    expiries = ExpiryPublisher(database, feed, ref_key)
    servicer = ConsentServicer(
        store,
        feed,
        ReceiptSigner.from_settings(settings),
        ref_key,
        Vocabulary({}, {}),
        requests,
        idempotency,
        PageTokens.from_settings(settings),
    )

    async def start() -> None:
        await asyncio.to_thread(database.migrate, customer_ref_key=ref_key)
        await servicer.reload_vocabulary()
        await feed.start()
        requests.start()
        expiries.start()

    async def stop() -> None:
        await expiries.stop()
        await requests.stop()
        await feed.stop()
        database.close()

    return App(
        name="consent",
        registrations=[
            Registration(
                consent_service_pb2.DESCRIPTOR.services_by_name["ConsentService"],
                consent_service_pb2_grpc.add_ConsentServiceServicer_to_server,
                servicer,
            ),
            data_subject_registration(ConsentDataSubjectServicer(database, feed, ref_key, idempotency)),
        ],
        start=start,
        stop=stop,
        drain=feed.close_watches,
    )
