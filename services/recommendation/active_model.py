"""The model a replica serves: the database's active version, loaded from the model directory.

Every replica polls the registry's active version (every POLL_SECONDS, a second) and, when
it changes, loads and verifies that artefact and builds its ServingModel off the event
loop, then swaps it in with one assignment: a request takes `current()` once and is
served wholly by that model (its model_version says which), and the next request sees the
new one. An artefact that fails its checksum is refused (logged once per version) and the
previous model stays.

Erasure overlay: a customer erased after a model's training read its data is still a row
of that model's arrays. Erasures are recorded in the database (serving_erasures, by the
customer's keyed hash, which names no one) and the poll reads them, so every replica masks the row (`is_erased`) — at once on the replica
that erased, within a poll elsewhere; the next model no longer has the row at all.

Items added after training: each poll (and at load) also looks at the serving catalog for
live items the model lacks whose metadata features it knows, and swaps in the model with
them appended (serving/new_items.py), built off the loop from the model as trained; same
version, same one-assignment swap, so a request sees them wholly or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, replace
from pathlib import Path

import sqlalchemy as sa
from google.protobuf import json_format
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from sqlalchemy.engine import Connection

from services.recommendation.artefacts import ArtefactError, ModelArtefact, read_artefact
from services.recommendation.registry import ModelRegistry
from services.recommendation.serving.model import ServingModel
from services.recommendation.serving.new_items import fold_key, known_features, with_new_items
from services.recommendation.serving_catalog import ServingCatalog
from services.recommendation.store import serving_erasures
from services.recommendation.training.options import resolve_options
from shared.keys import keyed_hash
from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.recommendation.active_model")

POLL_SECONDS = 1.0
BEHAVIOUR = "user.behavior."


@dataclass(frozen=True, eq=False)
class LoadedModel:
    version: str
    sha256: str
    artefact: ModelArtefact
    serving: ServingModel
    # Copy entries stored from this time on may be newer than what the model learned
    # (its training run started then): serving folds them in.
    fresh_after_us: int
    scheme: pb.FeatureScheme  # how the model weighted interactions and chose attributes (resolved)
    # The behaviour categories the model learned customers' rows from: a row is used only
    # while the customer grants them all.
    identity_categories: tuple[str, ...]
    # The serving arrays as trained (`serving` may have catalog items appended since).
    trained: ServingModel | None = None

    @property
    def as_trained(self) -> ServingModel:
        return self.trained or self.serving


def load_model(model_dir: Path, version: str, sha256: str, fresh_after_us: int) -> LoadedModel:
    """Reads, verifies and lays out one version for serving (blocking: run off the loop)."""
    artefact = read_artefact(model_dir, version, sha256)
    options = pb.TrainingOptions()
    with contextlib.suppress(json_format.ParseError, TypeError):
        json_format.ParseDict(artefact.metadata.get("options", {}), options, ignore_unknown_fields=True)
    options = resolve_options(options)
    categories = artefact.metadata.get("training_data", {}).get("data_categories", [])
    identity = tuple(sorted(c for c in categories if c.startswith(BEHAVIOUR))) or (
        "user.behavior.purchase_history",
    )
    return LoadedModel(
        version,
        sha256,
        artefact,
        ServingModel.from_artefact(artefact),
        fresh_after_us,
        options.features,
        identity,
    )


def _erasures(connection: Connection, since_us: int) -> dict[str, int]:
    """The erasures recorded at or after `since_us` (older ones no loaded model holds)."""
    rows = connection.execute(
        sa.select(serving_erasures.c.customer_ref, serving_erasures.c.erase_time_us).where(
            serving_erasures.c.erase_time_us >= since_us
        )
    )
    return {customer_ref: int(time_us) for customer_ref, time_us in rows}


def record_erasure(connection: Connection, customer_ref: str, time_us: int) -> None:
    """Records an erasure for every replica's overlay (in the erasing transaction)."""
    if not connection.execute(
        serving_erasures.update()
        .where(serving_erasures.c.customer_ref == customer_ref)
        .values(erase_time_us=time_us)
    ).rowcount:
        connection.execute(serving_erasures.insert().values(customer_ref=customer_ref, erase_time_us=time_us))


class ActiveModel:
    def __init__(
        self,
        registry: ModelRegistry,
        model_dir: Path,
        pseudonym_key: bytes,
        poll_seconds: float = POLL_SECONDS,
        catalog: ServingCatalog | None = None,
    ):
        self.registry = registry
        self.catalog = catalog  # whose items added after training are folded in
        self.pseudonym_key = pseudonym_key
        self.model_dir = model_dir
        self.poll_seconds = poll_seconds
        self._current: LoadedModel | None = None
        self._refused: tuple[str, str] | None = None
        self._erased: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def current(self) -> LoadedModel | None:
        """The model to serve this request with (None before any model is active and loaded)."""
        return self._current

    def customer_ref(self, customer_id: str) -> str:
        """The name serving_erasures knows the customer by."""
        return keyed_hash(self.pseudonym_key, customer_id)

    def is_erased(self, model: LoadedModel, customer_id: str) -> bool:
        """Was the customer erased after `model` read its data (their row is masked)?"""
        if not self._erased:
            return False
        erased_at = self._erased.get(self.customer_ref(customer_id))
        return erased_at is not None and erased_at >= model.fresh_after_us

    def erased(self, customer_ref: str, time_us: int) -> None:
        """This replica erased the customer: mask their row from the next request on."""
        self._erased[customer_ref] = time_us

    async def refresh(self) -> LoadedModel | None:
        """Loads the active version if it is not the one held; returns what is held."""
        held = self._current
        if held is not None:
            await self._read_erasures(held.fresh_after_us)
        active = await self.registry.active()
        if active is None or (held is not None and (held.version, held.sha256) == active):
            return await self.fold_new_items()
        if active == self._refused:
            return held
        version, sha256 = active
        fresh_after_us = await self._training_start(version)
        try:
            loaded = await asyncio.to_thread(load_model, self.model_dir, version, sha256, fresh_after_us)
        except ArtefactError as error:
            self._refused = active
            log.error("model_artefact_refused", model_version=version, error=str(error))
            return held
        # Before the swap: an older model (a rollback) has rows of customers erased since its training.
        await self._read_erasures(loaded.fresh_after_us)
        self._current = loaded
        log.info("model_loaded", model_version=version, items=len(loaded.serving.item_ids))
        return await self.fold_new_items()

    async def fold_new_items(self) -> LoadedModel | None:
        """Swaps in the held model with the catalog's items added since its training (those
        whose features it knows) appended, when they differ from what it holds; returns
        what is held."""
        held = self._current
        if held is None or self.catalog is None:
            return held
        trained = held.as_trained
        new = [
            (item_id, features)
            # By the served model's catalog rows (cached per snapshot, requests use them too).
            for item_id, features in self.catalog.snapshot().new_items(held.serving, len(trained.item_ids))
            if known_features(trained, features)
        ]
        if fold_key(new) == held.serving.fold_key:
            return held
        serving = await asyncio.to_thread(with_new_items, trained, new, held.scheme.identity_weight)
        if self._current is held:  # not replaced by a newer version meanwhile
            self._current = replace(held, serving=serving, trained=trained)
            log.info("model_items_folded_in", model_version=held.version, items=len(new))
        return self._current

    async def _read_erasures(self, since_us: int) -> None:
        # Only ever added to: a read that began before a local erasure committed loses nothing.
        self._erased.update(await self.registry.db.read(lambda connection: _erasures(connection, since_us)))

    async def _training_start(self, version: str) -> int:
        model = await self.registry.get_model(version)
        if not model.training_run_id:
            return model.create_time_us
        run = await self.registry.get_run(model.training_run_id)
        return run.start_time_us or run.create_time_us

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # the database is away, say: keep serving what is held
                log.warning("active_model_poll_failed", error=type(error).__name__)
            await asyncio.sleep(self.poll_seconds)
