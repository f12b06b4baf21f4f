"""RecommendationService over gRPC: protobuf in, domain calls, protobuf out — nothing else.

Every RPC of the contract: the catalog (catalog.py, store.py; serving_catalog.py follows
it), serving (recommending.py, similar_items.py over the active model, active_model.py)
and the model registry (registry.py; training itself runs in the training worker).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.active_model import ActiveModel
from services.recommendation.artefacts import ArtefactError, read_artefact
from services.recommendation.catalog import Item, Outcome, check_upsert, parse_category_prefix
from services.recommendation.recommending import (
    MAX_RECENT,
    Recommendations,
    Recommender,
    check_batch,
    check_ids,
    check_k,
    check_max_reasons,
    filter_of,
    options_of,
)
from services.recommendation.registry import Model, ModelRegistry, TrainingRun
from services.recommendation.serving.reasons import add_reason_messages
from services.recommendation.serving_catalog import ServingCatalog
from services.recommendation.similar_items import SimilarFinder, item_not_found
from services.recommendation.store import RecommendationStore
from services.recommendation.training.options import check_training_options
from shared.auth import current_principal
from shared.errors import FailedPrecondition, InvalidArgument
from shared.page_tokens import PageTokens
from shared.proto_time import duration_of_micros, set_timestamp, timestamp_of
from shared.validation import Violations, page_size_of

OUTCOMES = {
    Outcome.CREATED: pb.UPSERT_ITEM_OUTCOME_CREATED,
    Outcome.UPDATED: pb.UPSERT_ITEM_OUTCOME_UPDATED,
    Outcome.UNCHANGED: pb.UPSERT_ITEM_OUTCOME_UNCHANGED,
}


def item_of(message: pb.Item) -> Item:
    """The item as sent; create_time and update_time are output only and ignored."""
    return Item(
        item_id=message.item_id,
        title=message.title,
        category_path=tuple(message.category_path),
        brand=message.brand,
        price_micros=message.price_micros,
        currency_code=message.currency_code,
        tags=tuple(message.tags),
        available=message.available,
        attributes=dict(message.attributes),
    )


def item_message(item: Item) -> pb.Item:
    return pb.Item(
        item_id=item.item_id,
        title=item.title,
        category_path=item.category_path,
        brand=item.brand,
        price_micros=item.price_micros,
        currency_code=item.currency_code,
        tags=item.tags,
        available=item.available,
        attributes=item.attributes,
        create_time=timestamp_of(item.create_time_us),
        update_time=timestamp_of(item.update_time_us),
    )


def training_run_message(run: TrainingRun) -> pb.TrainingRun:
    running = run.state == pb.TRAINING_RUN_STATE_RUNNING
    eta = run.eta_seconds if running and run.eta_seconds is not None else None
    return pb.TrainingRun(
        training_run_id=run.training_run_id,
        model_version=run.model_version,
        state=run.state,
        options=run.options,
        auto_activate=run.auto_activate,
        requested_by=run.requested_by,
        create_time=timestamp_of(run.create_time_us),
        start_time=timestamp_of(run.start_time_us),
        end_time=timestamp_of(run.end_time_us),
        epochs_completed=run.epochs_completed,
        failure_reason=run.failure_reason,
        failure_message=run.failure_message,
        phase=run.phase if running else pb.TRAINING_PHASE_UNSPECIFIED,
        progress=run.progress,
        estimated_time_remaining=duration_of_micros(None if eta is None else int(eta * 1_000_000)),
    )


def model_message(model: Model) -> pb.Model:
    return pb.Model(
        model_version=model.model_version,
        status=model.status,
        training_run_id=model.training_run_id,
        options=model.options,
        training_data=model.training_data,
        evaluation=model.evaluation,
        status_message=model.status_message,
        create_time=timestamp_of(model.create_time_us),
        update_time=timestamp_of(model.update_time_us),
        activate_time=timestamp_of(model.activate_time_us),
        retire_time=timestamp_of(model.retire_time_us),
        forced_activation_reason=model.forced_activation_reason,
        library_versions=model.library_versions,
        artefact_sha256=model.artefact_sha256,
    )


def fill_recommendations(
    message: pb.Recommendations, found: Recommendations, title_of: Callable[[str], str]
) -> None:
    """Fills an empty Recommendations message in place (one add() per item and reason: the
    fewest protobuf calls; building each message apart and copying it in costs about twice)."""
    message.customer_id = found.customer_id
    items = message.items
    for rank, item in enumerate(found.items, start=1):
        added = items.add(item_id=item.item_id, score=item.score, rank=rank)
        add_reason_messages(added.reasons, item.reasons, title_of)
    message.model_version = found.model_version
    message.personalized = found.personalized
    message.fallback_reason = found.fallback  # type: ignore[assignment]
    message.data_categories_used.extend(found.data_categories)
    set_timestamp(message.serve_time, found.serve_time_us)
    message.consent_revision = found.consent_revision
    message.recommendation_id = found.recommendation_id


SERVICE = pb.DESCRIPTOR.services_by_name["RecommendationService"]


class RecommendationServicer(pb_grpc.RecommendationServiceServicer):
    def __init__(
        self,
        store: RecommendationStore,
        max_response_bytes: int,
        tokens: PageTokens,
        registry: ModelRegistry,
        model_dir: Path,
        active_model: ActiveModel,
        catalog: ServingCatalog,
        recommender: Recommender,
    ):
        self.store = store
        self.registry = registry
        self.model_dir = model_dir
        # The served model; requests read active_model.current() once each.
        self.active_model = active_model
        self.catalog = catalog
        self.recommender = recommender
        self.similar = SimilarFinder(active_model, catalog)
        self.pages = tokens.of_service(SERVICE)
        # A page of 1000 items with every attribute filled would exceed the message limit:
        # a List page then holds fewer items (AIP-158 allows it) and the token goes on from there.
        self.max_response_bytes = max_response_bytes

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        batch = [item_of(message) for message in request.items]
        check_upsert(batch, violations)
        violations.raise_if_any()
        results = await self.store.upsert_items(str(current_principal()), request, batch)
        # This replica serves the change from its next request (the others within a poll).
        self.catalog.apply(
            (dataclasses.replace(item, update_time_us=result.update_time_us), False)
            for item, result in zip(batch, results, strict=True)
        )
        return pb.UpsertItemsResponse(
            results=[
                pb.UpsertItemResult(
                    item_id=r.item_id, outcome=OUTCOMES[r.outcome], update_time=timestamp_of(r.update_time_us)
                )
                for r in results
            ]
        )

    async def GetItem(self, request: pb.GetItemRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("item_id", request.item_id)
        violations.raise_if_any()
        item = await self.store.get_item(request.item_id)
        if item is None:
            raise item_not_found(request.item_id)
        return pb.GetItemResponse(item=item_message(item))

    async def DeleteItem(self, request: pb.DeleteItemRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("item_id", request.item_id)
        violations.raise_if_any()
        deleted_at = await self.store.delete_item(request.item_id)
        if deleted_at is None and not request.allow_missing:
            raise item_not_found(request.item_id)
        self.catalog.deleted(request.item_id)
        return pb.DeleteItemResponse(item_id=request.item_id, deleted=deleted_at is not None)

    async def Recommend(self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        if request.customer_id:
            violations.require_id("customer_id", request.customer_id)
        options = options_of(violations, "options", request.options)
        recent = request.context.recent_item_ids
        check_ids(violations, "context.recent_item_ids", recent, MAX_RECENT)
        violations.raise_if_any()
        found = await self.recommender.recommend(request.customer_id, options, recent)
        response = pb.RecommendResponse()
        fill_recommendations(response.recommendations, found, self.catalog.snapshot().title_of)
        return response

    async def BatchRecommend(
        self, request: pb.BatchRecommendRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.BatchRecommendResponse]:
        violations = Violations()
        check_batch(violations, "customer_ids", request.customer_ids)
        options = options_of(violations, "options", request.options)
        violations.raise_if_any()
        async for found in self.recommender.recommend_many(list(request.customer_ids), options):
            response = pb.BatchRecommendResponse()
            fill_recommendations(response.recommendations, found, self.catalog.snapshot().title_of)
            yield response

    async def SimilarItems(self, request: pb.SimilarItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("item_id", request.item_id)
        k = check_k(violations, "k", request.k)
        prefixes, excluded = filter_of(violations, "filter", request.filter)
        max_reasons = check_max_reasons(violations, "max_reasons", request.max_reasons)
        violations.raise_if_any()
        found = self.similar.similar(
            request.item_id, k, prefixes, excluded, request.filter.include_unavailable, max_reasons
        )
        response = pb.SimilarItemsResponse(
            model_version=found.model_version,
            fallback_reason=found.fallback,  # type: ignore[arg-type]
            serve_time=timestamp_of(found.serve_time_us),
        )
        title_of = self.catalog.snapshot().title_of
        for rank, item in enumerate(found.items, start=1):
            added = response.items.add(item_id=item.item_id, similarity=item.similarity, rank=rank)
            add_reason_messages(added.reasons, item.reasons, title_of)
        return response

    async def ListItems(self, request: pb.ListItemsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        try:
            size = page_size_of(request.page_size)
        except InvalidArgument as error:
            violations.found.extend(error.violations)
            size = 0
        prefix = parse_category_prefix("category_prefix", request.category_prefix, violations)
        violations.raise_if_any()
        filters = {"category_prefix": request.category_prefix, "available_only": request.available_only}
        position = self.pages.read("ListItems", request.page_token, filters, (str,))
        after = str(position[0]) if position else ""
        found, more = await self.store.list_items(after, size, prefix, request.available_only)
        page: list[pb.Item] = []
        used = 0
        for item in found:
            message = item_message(item)
            used += message.ByteSize() + 8  # the field's tag and length prefix, at most
            if page and used > self.max_response_bytes:
                more = True
                break
            page.append(message)
        token = ""
        if more:
            token = self.pages.issue("ListItems", filters, (page[-1].item_id,))
        return pb.ListItemsResponse(items=page, next_page_token=token)

    async def TrainModel(self, request: pb.TrainModelRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_request_id("request_id", request.request_id)
        check_training_options(request.options, violations)
        violations.raise_if_any()
        auto_activate = request.auto_activate if request.HasField("auto_activate") else True
        run, model = await self.registry.queue_training(
            str(current_principal()), request, request.options, auto_activate
        )
        return pb.TrainModelResponse(training_run=training_run_message(run), model=model_message(model))

    async def GetTrainingRun(
        self, request: pb.GetTrainingRunRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("training_run_id", request.training_run_id)
        violations.raise_if_any()
        run = await self.registry.get_run(request.training_run_id)
        return pb.GetTrainingRunResponse(training_run=training_run_message(run))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("model_version", request.model_version)
        violations.raise_if_any()
        return pb.GetModelResponse(model=model_message(await self.registry.get_model(request.model_version)))

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        try:
            size = page_size_of(request.page_size)
        except InvalidArgument as error:
            violations.found.extend(error.violations)
            size = 0
        for i, status in enumerate(request.statuses):
            if status not in pb.ModelStatus.values() or status == pb.MODEL_STATUS_UNSPECIFIED:
                violations.add(f"statuses[{i}]", "must be a ModelStatus other than UNSPECIFIED")
        violations.raise_if_any()
        statuses = sorted(set(request.statuses))
        filters = {"statuses": statuses}
        position = self.pages.read("ListModels", request.page_token, filters, (str,))
        before = str(position[0]) if position else ""
        found, more = await self.registry.list_models(before, size, statuses)
        token = self.pages.issue("ListModels", filters, (found[-1].model_version,)) if more else ""
        return pb.ListModelsResponse(models=[model_message(m) for m in found], next_page_token=token)

    async def ActivateModel(self, request: pb.ActivateModelRequest, context: grpc.aio.ServicerContext) -> Any:
        violations = Violations()
        violations.require_id("model_version", request.model_version)
        if request.force:
            violations.require_text("force_reason", request.force_reason, max_length=512)
        violations.raise_if_any()
        model = await self.registry.get_model(request.model_version)
        if model.status != pb.MODEL_STATUS_ACTIVE and model.artefact_sha256:
            # Checked here too, so a corrupt artefact is refused before any replica is told to load it.
            try:
                await asyncio.to_thread(
                    read_artefact, self.model_dir, model.model_version, model.artefact_sha256
                )
            except ArtefactError as error:
                raise FailedPrecondition(
                    str(error),
                    reason="MODEL_ARTEFACT_INVALID",
                    metadata={"model_version": model.model_version},
                ) from error
        elif model.status in (pb.MODEL_STATUS_READY, pb.MODEL_STATUS_REJECTED, pb.MODEL_STATUS_RETIRED):
            raise FailedPrecondition(
                f"model {model.model_version} has no artefact to serve",
                reason="MODEL_ARTEFACT_INVALID",
                metadata={"model_version": model.model_version},
            )
        activation = await self.registry.activate(request.model_version, request.force, request.force_reason)
        return pb.ActivateModelResponse(
            model=model_message(activation.model), previous_model_version=activation.previous_model_version
        )

    async def GetModelEvaluation(
        self, request: pb.GetModelEvaluationRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        violations = Violations()
        violations.require_id("model_version", request.model_version)
        violations.raise_if_any()
        model = await self.registry.get_model(request.model_version)
        if model.evaluation is None:
            raise FailedPrecondition(
                f"model {model.model_version} is {pb.ModelStatus.Name(model.status)}: it has no evaluation",
                reason="EVALUATION_NOT_AVAILABLE",
                metadata={"model_version": model.model_version},
            )
        return pb.GetModelEvaluationResponse(evaluation=model.evaluation)
