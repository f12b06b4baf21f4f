"""The model a replica serves: the database's active version, loaded from the model directory.

Every replica polls the registry's active version (every POLL_SECONDS, a second) and, when it changes, loads and verifies that artefact off the event
loop and swaps it in with one assignment: a reader holding `current()` keeps the model
it got for the whole request, and the next request sees the new one. An artefact that
fails its checksum is refused (logged once per version) and the previous model stays.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from services.recommendation.artefacts import ArtefactError, ModelArtefact, read_artefact
from services.recommendation.registry import ModelRegistry
from shared.log import get_logger

log = get_logger("najimi.recommendation.active_model")

POLL_SECONDS = 1.0


@dataclass(frozen=True)
class LoadedModel:
    version: str
    sha256: str
    artefact: ModelArtefact


class ActiveModel:
    def __init__(self, registry: ModelRegistry, model_dir: Path, poll_seconds: float = POLL_SECONDS):
        self.registry = registry
        self.model_dir = model_dir
        self.poll_seconds = poll_seconds
        self._current: LoadedModel | None = None
        self._refused: tuple[str, str] | None = None
        self._task: asyncio.Task[None] | None = None

    def current(self) -> LoadedModel | None:
        """The model to serve this request with (None before any model is active and loaded)."""
        return self._current

    async def refresh(self) -> LoadedModel | None:
        """Loads the active version if it is not the one held; returns what is held."""
        active = await self.registry.active()
        held = self._current
        if active is None or (held is not None and (held.version, held.sha256) == active):
            return held
        if active == self._refused:
            return held
        version, sha256 = active
        try:
            artefact = await asyncio.to_thread(read_artefact, self.model_dir, version, sha256)
        except ArtefactError as error:
            self._refused = active
            log.error("model_artefact_refused", model_version=version, error=str(error))
            return held
        self._current = LoadedModel(version, sha256, artefact)
        log.info("model_loaded", model_version=version, items=len(artefact.item_ids))
        return self._current

    def start(self) -> None:
        self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # the database is away, say: keep serving what is held
                log.warning("active_model_poll_failed", error=type(error).__name__)
            await asyncio.sleep(self.poll_seconds)
