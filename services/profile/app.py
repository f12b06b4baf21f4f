"""Wires the profile service together: settings -> PII key -> store -> servicers -> App.

The PII master key (32 bytes; services/profile/pii.py derives the encryption and the
identifier-hashing keys from it) comes from, in this order:
- NAJIMI_PROFILE_PII_KEY: the key, base64-encoded (e.g. `openssl rand -base64 32`).
  Use this in production, from a secret: every replica must hold the same key.
- otherwise <data_dir>/profile-pii.key, generated on first start (mode 0600) and
  reused after, so development data survives restarts (see shared/keys.py).
Losing the key loses the PII (it cannot be decrypted); keep it with the database backups.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.profile.v1 import profile_service_pb2, profile_service_pb2_grpc

from services.profile.customer_cache import CustomerCache
from services.profile.customer_changes import CustomerChangeListener
from services.profile.data_subject import ProfileDataSubjectServicer
from services.profile.events import EventIngestor
from services.profile.pii import KEY_BYTES, PiiProtector
from services.profile.servicer import ProfileServicer
from services.profile.store import ProfileStore
from shared.clients import channel_credentials
from shared.consent_cache import ConsentCache
from shared.data_subject import data_subject_registration
from shared.db import Database
from shared.idempotency import Idempotency
from shared.keys import configured_key
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"
PII_KEY_VARIABLE = "NAJIMI_PROFILE_PII_KEY"
PII_KEY_FILE = "profile-pii.key"


def pii_master_key(settings: Settings) -> bytes:
    """The PII master key from the environment or the key file (see the module docstring)."""
    return configured_key(
        settings.profile_pii_key.get_secret_value(),
        PII_KEY_VARIABLE,
        settings.data_dir,
        PII_KEY_FILE,
        KEY_BYTES,
    )


def build_app(settings: Settings) -> App:
    protector = PiiProtector(pii_master_key(settings))
    database = Database(settings.effective_database_url, "profile", MIGRATIONS)
    customer_cache = CustomerCache(settings.profile_customer_cache_size)
    idempotency = Idempotency.from_settings(settings, seal=protector.encrypt, unseal=protector.decrypt)
    store = ProfileStore(database, protector, idempotency, customer_cache)
    # On PostgreSQL other replicas change customers too: their changes reach this
    # replica's cache as notices (customer_changes.py); SQLite belongs to this process.
    changes = (
        None if database.is_sqlite else CustomerChangeListener(database.engine.url, "profile", customer_cache)
    )
    # The consent state this service obeys: a local cache of the consent change feed.
    consent = ConsentCache(
        settings.consent_address, settings.service_token, credentials=channel_credentials(settings)
    )
    ingestor = EventIngestor(database, protector, consent, settings.consent_max_staleness_seconds)
    # RPCs not implemented yet are not overridden: the generated base answers
    # UNIMPLEMENTED, although its type stubs declare every RPC abstract.
    servicer = ProfileServicer(store, consent, settings, ingestor)  # type: ignore[abstract]
    # Committed events wake the interaction feed's watchers at once (it also polls).
    ingestor.on_commit(servicer.interactions.poke)
    # ... and the trait worker, which follows them into the trait aggregates (it polls too),
    # when it runs in this process; else a trait worker process does (trait_process.py).
    inline_traits = settings.profile_trait_worker == "inline"
    if inline_traits:
        ingestor.on_commit(servicer.trait_worker.notify)
        ingestor.on_stored(servicer.trait_worker.add_committed)  # the events, so it need not read them back

    async def start() -> None:
        await asyncio.to_thread(database.migrate, erasure_ref=protector.erasure_ref)
        await servicer.interactions.start()
        if changes is not None:
            changes.start()
        if inline_traits:
            servicer.trait_worker.start()
        # Listed and watched in the background: until the cache is fresh, calls that
        # depend on consent fail closed (UNAVAILABLE), so profile serves even while
        # consent is down.
        consent.start()

    async def stop() -> None:
        await servicer.interactions.stop()
        await servicer.trait_worker.stop()
        await consent.stop()
        if changes is not None:
            await asyncio.to_thread(changes.stop)
        database.close()

    return App(
        name="profile",
        registrations=[
            Registration(
                profile_service_pb2.DESCRIPTOR.services_by_name["ProfileService"],
                profile_service_pb2_grpc.add_ProfileServiceServicer_to_server,
                servicer,
            ),
            data_subject_registration(ProfileDataSubjectServicer(store)),
        ],
        start=start,
        stop=stop,
        # Watch streams end (UNAVAILABLE) when the server begins to stop, so followers
        # reconnect elsewhere instead of holding the graceful stop to its limit.
        drain=servicer.interactions.close_watches,
    )
