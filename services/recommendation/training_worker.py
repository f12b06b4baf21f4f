"""The training worker: takes a queued run, trains, writes the artefact, registers the model.

Training never runs in a serving process: `python -m services.recommendation.train`
runs this worker (`--worker` polls the queue; `make run` starts one). The pipeline
(`run_training`, training/pipeline.py) is handed in, so tests inject a small fake.
Progress reaches the database at most every PROGRESS_SECONDS (and on every phase change),
with an estimate of the time left from the speed so far. Any error fails the run with a
readable reason and message, and leaves the active model as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import importlib.metadata
import platform
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from google.protobuf import json_format
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.artefacts import write_artefact
from services.recommendation.registry import Finished, Model, ModelRegistry, TrainingRun
from shared.log import get_logger
from shared.tasks import cancel_and_wait

log = get_logger("najimi.recommendation.training_worker")

PROGRESS_SECONDS = 0.5
# No estimate before this share of the run is done: the first phases say little about the rest.
ESTIMATE_AFTER = 0.02
EPOCH = re.compile(r"epoch (\d+)", re.IGNORECASE)
# The pipeline's phase names (training/pipeline.py Progress.phase) that differ from the contract's.
PHASE_ALIASES = {"WRITING": "WRITING_ARTEFACTS"}
LIBRARIES = ("lightfm", "rectools-lightfm", "numpy", "scipy", "faiss-cpu")


class ProgressLike(Protocol):
    phase: str
    fraction: float
    message: str


RunTraining = Callable[[Any, pb.TrainingOptions, Callable[[Any], None]], Awaitable[Any]]
Observer = Callable[[TrainingRun, ProgressLike], None]


@dataclass
class Step:
    """A progress report of the worker's own (the pipeline's have the same three fields)."""

    phase: str
    fraction: float
    message: str


# Where writing starts in the whole run's progress (training/pipeline.py PHASE_SPANS["WRITING"]).
WRITING_FROM = 0.95


class TrainingError(Exception):
    """A failure the pipeline explains: `reason` is the run's failure_reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def library_versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            found[name.removeprefix("rectools-")] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


PHASES = {name.removeprefix("TRAINING_PHASE_") for name in pb.TrainingPhase.keys()}


class ProgressTracker:
    """Collects the pipeline's progress calls (from any thread) for the run's row."""

    def __init__(self, started: float):
        self.started = started
        self.lock = threading.Lock()
        self.phase = pb.TRAINING_PHASE_PULLING_DATA
        self.fraction = 0.0
        self.epochs = 0
        self.changed = threading.Event()

    def __call__(self, progress: ProgressLike) -> None:
        name = PHASE_ALIASES.get(progress.phase, progress.phase)
        with self.lock:
            # An unknown phase name keeps the last known phase: progress never fails a run.
            phase = pb.TrainingPhase.Value(f"TRAINING_PHASE_{name}") if name in PHASES else self.phase
            if phase != self.phase:
                self.epochs = 0
                self.changed.set()  # a new phase is written at once
            self.phase = phase
            self.fraction = min(max(float(progress.fraction), self.fraction), 1.0)
            if phase in (pb.TRAINING_PHASE_FITTING, pb.TRAINING_PHASE_REFITTING):
                # Progress.epochs_completed when the pipeline gives it, else "epoch N" in the message.
                epochs = getattr(progress, "epochs_completed", None)
                epoch = EPOCH.search(progress.message or "") if epochs is None else None
                if epochs is not None or epoch:
                    self.epochs = int(epochs if epochs is not None else epoch.group(1))  # type: ignore[union-attr]

    def snapshot(self) -> tuple[int, float, int, float | None]:
        with self.lock:
            elapsed = time.monotonic() - self.started
            eta = elapsed * (1 - self.fraction) / self.fraction if self.fraction >= ESTIMATE_AFTER else None
            return self.phase, self.fraction, self.epochs, eta


class TrainingWorker:
    def __init__(
        self,
        registry: ModelRegistry,
        model_dir: Path,
        run_training: RunTraining,
        make_source: Callable[[], Any],
        observe: Observer | None = None,
    ):
        self.registry = registry
        self.model_dir = model_dir
        self.run_training = run_training
        self.make_source = make_source
        self.observe = observe

    async def run_once(self) -> Model | None:
        """Claims and runs the next queued run; None when none waits."""
        run = await self.registry.claim_next()
        if run is None:
            return None
        return await self.train(run)

    async def serve(self, stop: asyncio.Event, poll_seconds: float) -> None:
        """Runs queued runs until `stop` is set, polling every `poll_seconds` while idle. A stop
        during a run abandons it: the run fails (WORKER_STOPPED) and the active model stays."""
        while not stop.is_set():
            work = asyncio.create_task(self.run_once())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not work.done():
                await cancel_and_wait(work)
                return
            try:
                ran = work.result()
            except Exception:  # the database is away, say: log, and try again at the next poll
                log.exception("training_poll_failed")
                ran = None
            if ran is None:
                try:
                    async with asyncio.timeout(poll_seconds):  # not wait_for (3.11 cancel swallow)
                        await stop.wait()
                except TimeoutError:
                    pass

    async def train(self, run: TrainingRun) -> Model:
        tracker = ProgressTracker(time.monotonic())
        log.info("training_started", training_run_id=run.training_run_id, model_version=run.model_version)

        def progress(update: ProgressLike) -> None:
            tracker(update)
            if self.observe is not None:
                self.observe(run, update)

        reporter = asyncio.create_task(self._report(run.training_run_id, tracker))
        try:
            outcome = await self.run_training(self.make_source(), run.options, progress)
            progress(
                Step("WRITING_ARTEFACTS", WRITING_FROM, "writing the artefact")
            )  # the worker's own phase
            finished = await self._register_artefact(run, outcome)
        except asyncio.CancelledError:
            reporter.cancel()
            log.warning("training_abandoned", training_run_id=run.training_run_id)
            # Shielded: the run is marked failed even though this task is being cancelled.
            await asyncio.shield(
                self.registry.fail(
                    run.training_run_id, "WORKER_STOPPED", "the training worker was stopped during the run"
                )
            )
            raise
        except Exception as error:
            reason = error.reason if isinstance(error, TrainingError) else getattr(error, "reason", "")
            reason = reason if isinstance(reason, str) and reason else "TRAINING_ERROR"
            message = f"{type(error).__name__}: {error}"
            log.exception("training_failed", training_run_id=run.training_run_id, reason=reason)
            reporter.cancel()
            await self.registry.fail(run.training_run_id, reason, message)
            return await self.registry.get_model(run.model_version)
        reporter.cancel()
        model = await self.registry.succeed(run, finished)
        log.info(
            "training_finished",
            training_run_id=run.training_run_id,
            model_version=run.model_version,
            status=pb.ModelStatus.Name(model.status),
            seconds=round(time.monotonic() - tracker.started, 2),
        )
        return model

    async def _report(self, run_id: str, tracker: ProgressTracker) -> None:
        """Writes the tracker's state every PROGRESS_SECONDS, or at once on a new phase."""
        while True:
            await asyncio.to_thread(tracker.changed.wait, PROGRESS_SECONDS)
            tracker.changed.clear()
            try:
                await self.registry.report_progress(run_id, *tracker.snapshot())
            except Exception as error:  # progress is best effort: the run goes on
                log.warning("training_progress_not_written", error=type(error).__name__)

    async def _register_artefact(self, run: TrainingRun, outcome: Any) -> Finished:
        """Writes the outcome's artefact (gate passed) and turns the outcome into what the
        registry records."""
        options = pb.TrainingOptions()
        json_format.ParseDict(outcome.resolved_options or {}, options, ignore_unknown_fields=True)
        evaluation = pb.ModelEvaluation()
        json_format.ParseDict(outcome.evaluation or {}, evaluation, ignore_unknown_fields=True)
        evaluation.model_version = run.model_version
        evaluation.passed_gate = bool(outcome.passed_gate)
        if not evaluation.HasField("protocol"):
            evaluation.protocol.CopyFrom(options.evaluation)
        if not evaluation.HasField("evaluate_time"):
            evaluation.evaluate_time.GetCurrentTime()
        training_data = pb.TrainingData()
        versions = library_versions()
        checksum = ""
        if outcome.artefact is not None:
            # The pipeline's account of its data (TrainingData as JSON), when it gives one.
            json_format.ParseDict(
                outcome.artefact.metadata.get("training_data") or {},
                training_data,
                ignore_unknown_fields=True,
            )
            artefact = dataclasses.replace(
                outcome.artefact,
                version=run.model_version,
                metadata={
                    **outcome.artefact.metadata,
                    "options": json_format.MessageToDict(options, preserving_proto_field_name=True),
                    "evaluation": json_format.MessageToDict(evaluation, preserving_proto_field_name=True),
                    "data_cursor": outcome.data_cursor,
                    "phase_seconds": outcome.phase_seconds,
                    "library_versions": versions,
                    "created_time": datetime.datetime.now(datetime.UTC).isoformat(),
                },
            )
            training_data.customer_count = training_data.customer_count or len(artefact.customer_ids)
            training_data.item_count = training_data.item_count or len(artefact.item_ids)
            training_data.customer_feature_count = len(artefact.customer_feature_names)
            training_data.item_feature_count = len(artefact.item_feature_names)
            checksum = await asyncio.to_thread(write_artefact, self.model_dir, artefact)
        elif outcome.passed_gate:
            raise TrainingError(
                "NO_ARTEFACT", "the model passed the gate but the pipeline returned no artefact"
            )
        training_data.data_cursor = outcome.data_cursor or training_data.data_cursor
        return Finished(
            evaluation=evaluation,
            passed_gate=bool(outcome.passed_gate),
            gate_message=outcome.gate_message,
            options=options,
            training_data=training_data,
            library_versions=versions,
            artefact_sha256=checksum,
        )


def default_pipeline(settings: Any, database: Any) -> tuple[RunTraining, Callable[[], Any]]:
    """The pipeline (training/pipeline.py) and its data source (training/dataset.py). Without
    them every run fails with PIPELINE_UNAVAILABLE, and the worker itself keeps running."""
    try:
        pipeline = importlib.import_module("services.recommendation.training.pipeline")
        dataset = importlib.import_module("services.recommendation.training.dataset")
    except ModuleNotFoundError as error:
        missing = str(error)

        async def unavailable(
            source: Any, options: pb.TrainingOptions, progress: Callable[[Any], None]
        ) -> Any:
            raise TrainingError("PIPELINE_UNAVAILABLE", f"the training pipeline is not installed ({missing})")

        return unavailable, lambda: None
    return pipeline.run_training, lambda: dataset.TrainingSource(settings, database)
