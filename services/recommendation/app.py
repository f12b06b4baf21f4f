"""Wires the recommendation service together: settings -> store -> servicers -> App."""

from __future__ import annotations

import asyncio
from pathlib import Path

from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2, recommendation_service_pb2_grpc
from threadpoolctl import threadpool_limits

from services.recommendation.active_model import ActiveModel
from services.recommendation.customer_attributes import CustomerAttributeCache
from services.recommendation.customer_history import CustomerHistory
from services.recommendation.data_subject import RecommendationDataSubjectServicer
from services.recommendation.interactions import InteractionCopy
from services.recommendation.recommending import Recommender
from services.recommendation.registry import ModelRegistry
from services.recommendation.servicer import RecommendationServicer
from services.recommendation.serving_catalog import ServingCatalog
from services.recommendation.store import RecommendationStore
from shared.clients import channel_credentials, client_for
from shared.consent_cache import ConsentCache
from shared.data_subject import data_subject_registration
from shared.db import Database
from shared.idempotency import Idempotency
from shared.keys import pseudonym_key
from shared.page_tokens import PageTokens
from shared.server import App, Registration
from shared.settings import Settings

MIGRATIONS = Path(__file__).parent / "migrations"


def build_app(settings: Settings) -> App:
    # One BLAS thread: each request's product is small, and requests run side by side on
    # the event loop; BLAS threads only contend for the replica's core (measured: the
    # 10k-item matrix-vector product 10x slower with two threads on a busy 2-core machine).
    threadpool_limits(limits=1, user_api="blas")
    database = Database(settings.effective_database_url, "recommendation", MIGRATIONS)
    idempotency = Idempotency.from_settings(settings)
    store = RecommendationStore(database, idempotency)
    registry = ModelRegistry(database, idempotency)
    # The consent state this service obeys, and the consented interaction copy it decides.
    consent = ConsentCache(
        settings.consent_address, settings.service_token, credentials=channel_credentials(settings)
    )
    copy = InteractionCopy(database, consent, settings)
    # Serving: the catalog, each customer's history and attributes, kept in memory.
    catalog = ServingCatalog(database)
    active_model = ActiveModel(
        registry, settings.effective_model_dir, pseudonym_key(settings), catalog=catalog
    )
    history = CustomerHistory(database)
    copy.on_change.append(history.changed)
    attributes = CustomerAttributeCache(None)  # its profile client is opened on the loop, in start()
    channels = []
    recommender = Recommender(
        active_model, catalog, consent, history, attributes, settings.consent_max_staleness_seconds
    )

    async def start() -> None:
        await asyncio.to_thread(database.migrate)
        # Both follow their feeds in the background (and retry while the others are down).
        consent.start()
        copy.start()
        await catalog.start()
        # Serves the database's active version (with the catalog's items added since its
        # training), and follows every later activation.
        await active_model.refresh()
        active_model.start()
        attributes.profile, channel = client_for(
            profile_grpc.ProfileServiceStub, settings.profile_address, settings
        )
        channels.append(channel)

    async def stop() -> None:
        await catalog.stop()
        await active_model.stop()
        for channel in channels:
            await channel.close()
        await copy.stop()
        await consent.stop()
        database.close()

    return App(
        name="recommendation",
        registrations=[
            Registration(
                recommendation_service_pb2.DESCRIPTOR.services_by_name["RecommendationService"],
                recommendation_service_pb2_grpc.add_RecommendationServiceServicer_to_server,
                RecommendationServicer(
                    store,
                    max_response_bytes=settings.max_message_bytes * 3 // 4,
                    tokens=PageTokens.from_settings(settings),
                    registry=registry,
                    model_dir=settings.effective_model_dir,
                    active_model=active_model,
                    catalog=catalog,
                    recommender=recommender,
                ),
            ),
            data_subject_registration(
                RecommendationDataSubjectServicer(store, copy, active_model, attributes)
            ),
        ],
        start=start,
        stop=stop,
    )
