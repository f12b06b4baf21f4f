"""The model registry and training jobs through real in-process gRPC servers, on SQLite and
PostgreSQL: TrainModel queues, a training worker (with a small fake pipeline injected in
place of training/pipeline.py) trains, the model is gated, registered and activated, and
every replica on the same database and model directory loads the active version."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import scipy.sparse
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.active_model import ActiveModel
from services.recommendation.artefacts import ArtefactError, ModelArtefact, read_artefact
from services.recommendation.registry import ModelRegistry
from services.recommendation.training_worker import TrainingError, TrainingWorker
from shared.db import Database
from shared.idempotency import Idempotency
from tests.conftest import error_reason, field_violations, rpc_error

DEADLINE_SECONDS = 15.0


@dataclass
class Progress:
    phase: str
    fraction: float
    message: str


@dataclass
class Outcome:
    artefact: ModelArtefact | None
    evaluation: dict[str, Any]
    passed_gate: bool
    gate_message: str
    resolved_options: dict[str, Any]
    data_cursor: str
    phase_seconds: dict[str, float] = field(default_factory=dict)


def random_artefact(seed: int, items: int = 7, customers: int = 5, d: int = 4) -> ModelArtefact:
    rng = np.random.default_rng(seed)

    def floats(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    item_names = [f"item:i{i}" for i in range(items)] + ["brand:acme"]
    customer_names = [f"customer:c{j}" for j in range(customers)] + ["region:jp-13"]
    item_features = scipy.sparse.hstack(
        [scipy.sparse.identity(items) * 0.6, np.full((items, 1), 0.4)], format="csr", dtype=np.float32
    )
    customer_features = scipy.sparse.hstack(
        [scipy.sparse.identity(customers) * 0.6, np.full((customers, 1), 0.4)], format="csr", dtype=np.float32
    )
    return ModelArtefact(
        version="",
        item_ids=[f"i{i}" for i in range(items)],
        customer_ids=[f"c{j}" for j in range(customers)],
        item_embeddings=floats(items, d),
        item_biases=floats(items),
        customer_embeddings=floats(customers, d),
        customer_biases=floats(customers),
        item_feature_embeddings=floats(items + 1, d),
        item_feature_biases=floats(items + 1),
        customer_feature_embeddings=floats(customers + 1, d),
        customer_feature_biases=floats(customers + 1),
        item_feature_names=item_names,
        customer_feature_names=customer_names,
        item_features=item_features,
        customer_features=customer_features,
        metadata={
            "training_data": {"interaction_count": 42, "data_categories": ["user.behavior.purchase_history"]}
        },
    )


class FakePipeline:
    """Stands in for run_training: reports the phases, optionally waits in FITTING until
    released, and passes or fails the gate (or raises) as told."""

    def __init__(self) -> None:
        self.passes = True
        self.error: Exception | None = None
        self.hold: asyncio.Event | None = None
        self.calls = 0

    async def __call__(
        self, source: Any, options: pb.TrainingOptions, progress: Callable[[Any], None]
    ) -> Outcome:
        self.calls += 1
        progress(Progress("PULLING_DATA", 0.05, "reading the interaction copy"))
        progress(Progress("BUILDING_FEATURES", 0.1, "features"))
        progress(Progress("FITTING", 0.3, "epoch 2 of 10"))
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        progress(Progress("EVALUATING", 0.7, "evaluating"))
        model_p, baseline_p = (0.2, 0.1) if self.passes else (0.09, 0.1)
        required = baseline_p * 1.1
        verdict = "passed" if self.passes else "failed"
        progress(Progress("WRITING", 0.95, "writing"))
        return Outcome(
            artefact=random_artefact(self.calls),
            evaluation={
                "warm": {
                    "customerCount": 5,
                    "heldOutInteractionCount": 9,
                    "modelMetrics": {"precisionAtK": model_p, "auc": 0.8},
                    "baselineMetrics": {"precisionAtK": baseline_p, "auc": 0.6},
                },
                "requiredPrecisionAtK": required,
                "refitOnAllData": self.passes,
            },
            passed_gate=self.passes,
            gate_message=f"warm precision@10 {model_p} vs required {required:.3f} (baseline {baseline_p}): {verdict}",
            resolved_options={"lightfm": {"noComponents": 4, "epochs": 10}, "evaluation": {"k": 10}},
            data_cursor="cursor-1",
            phase_seconds={"FITTING": 0.01},
        )


@dataclass
class Rig:
    stub: pb_grpc.RecommendationServiceStub
    service: Any
    registry: ModelRegistry
    worker: TrainingWorker
    pipeline: FakePipeline
    model_dir: Path

    def auth(self, principal: str = "admin") -> Any:
        return self.service.auth(principal)

    def active_model(self, service: Any = None) -> ActiveModel:
        servicer = (service or self.service).running.app.registrations[0].servicer
        return servicer.active_model  # type: ignore[no-any-return]

    async def train(self, request_id: str, **fields: Any) -> pb.TrainModelResponse:
        return await self.stub.TrainModel(
            pb.TrainModelRequest(request_id=request_id, **fields), metadata=self.auth()
        )

    async def run(self, run_id: str) -> pb.TrainingRun:
        reply = await self.stub.GetTrainingRun(
            pb.GetTrainingRunRequest(training_run_id=run_id), metadata=self.auth()
        )
        return reply.training_run

    async def model(self, version: str) -> pb.Model:
        return (
            await self.stub.GetModel(pb.GetModelRequest(model_version=version), metadata=self.auth())
        ).model

    async def activate(self, version: str, **fields: Any) -> pb.ActivateModelResponse:
        return await self.stub.ActivateModel(
            pb.ActivateModelRequest(model_version=version, **fields), metadata=self.auth()
        )

    async def trained(self, request_id: str, **fields: Any) -> pb.Model:
        """Queues a run, has the worker run it, and returns its model."""
        queued = await self.train(request_id, **fields)
        assert await self.worker.run_once() is not None
        return await self.model(queued.model.model_version)


async def wait_for(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        found = await check()
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {DEADLINE_SECONDS} s: {what}")


@pytest.fixture
async def rig(start_service, database_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    service = await start_service("recommendation", database_url)
    database = Database(database_url, "recommendation")
    registry = ModelRegistry(database, Idempotency(b"k" * 32, 168))
    pipeline = FakePipeline()
    worker = TrainingWorker(registry, tmp_path / "models", pipeline, lambda: None)
    yield Rig(
        pb_grpc.RecommendationServiceStub(service.channel),
        service,
        registry,
        worker,
        pipeline,
        tmp_path / "models",
    )
    database.close()


async def test_a_queued_run_is_trained_by_the_worker_and_activated(rig: Rig) -> None:
    first = await rig.train("train-1")
    run, model = first.training_run, first.model
    assert run.state == pb.TRAINING_RUN_STATE_QUEUED and run.auto_activate and run.requested_by == "admin"
    assert model.status == pb.MODEL_STATUS_TRAINING and model.model_version == run.model_version
    # A retry returns the first run and creates no second one.
    again = await rig.train("train-1")
    assert again.training_run.training_run_id == run.training_run_id
    reused = await rpc_error(rig.train("train-1", auto_activate=False))
    assert error_reason(reused) == "REQUEST_ID_REUSED"

    rig.pipeline.hold = asyncio.Event()
    stop = asyncio.Event()
    serving = asyncio.create_task(rig.worker.serve(stop, 0.05))
    try:

        async def fitting() -> pb.TrainingRun | None:
            current = await rig.run(run.training_run_id)
            fit = current.phase == pb.TRAINING_PHASE_FITTING and current.HasField("estimated_time_remaining")
            return current if fit else None

        running = await wait_for(fitting, "the run reports FITTING with an estimate")
        assert running.state == pb.TRAINING_RUN_STATE_RUNNING and running.epochs_completed == 2
        assert running.progress == pytest.approx(0.3) and running.HasField("start_time")
        # At most one run at a time: another request waits for this one to end.
        busy = await rpc_error(rig.train("train-2"))
        assert busy.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_reason(busy) == "TRAINING_IN_PROGRESS"
        rig.pipeline.hold.set()

        async def succeeded() -> pb.TrainingRun | None:
            current = await rig.run(run.training_run_id)
            return current if current.state == pb.TRAINING_RUN_STATE_SUCCEEDED else None

        done = await wait_for(succeeded, "the run succeeds")
    finally:
        stop.set()
        await serving
    assert done.progress == 1.0 and done.phase == pb.TRAINING_PHASE_UNSPECIFIED and done.HasField("end_time")
    assert not done.HasField("estimated_time_remaining")
    assert done.options.lightfm.no_components == 4  # the resolved options are recorded

    active = await rig.model(run.model_version)
    assert active.status == pb.MODEL_STATUS_ACTIVE and active.HasField("activate_time")
    assert len(active.artefact_sha256) == 64 and "numpy" in active.library_versions
    assert active.training_data.data_cursor == "cursor-1" and active.training_data.item_count == 7
    assert active.training_data.interaction_count == 42  # the pipeline's account of its data
    assert list(active.training_data.data_categories) == ["user.behavior.purchase_history"]
    evaluation = (
        await rig.stub.GetModelEvaluation(
            pb.GetModelEvaluationRequest(model_version=run.model_version), metadata=rig.auth()
        )
    ).evaluation
    assert evaluation == active.evaluation
    assert evaluation.model_version == run.model_version and evaluation.passed_gate
    assert evaluation.warm.model_metrics.precision_at_k == pytest.approx(0.2)
    assert evaluation.warm.baseline_metrics.precision_at_k == pytest.approx(0.1)
    listed = await rig.stub.ListModels(
        pb.ListModelsRequest(statuses=[pb.MODEL_STATUS_ACTIVE]), metadata=rig.auth("service:storefront")
    )
    assert [m.model_version for m in listed.models] == [run.model_version]

    # The server's holder loads the activated artefact, verified.
    async def loaded() -> Any:
        current = rig.active_model().current()
        return current if current is not None and current.version == run.model_version else None

    held = await wait_for(loaded, "the server loads the active model")
    assert held.artefact.item_ids == [f"i{i}" for i in range(7)]
    assert held.artefact.metadata["data_cursor"] == "cursor-1"


async def test_a_model_that_fails_the_gate_is_rejected_and_activated_only_with_force(rig: Rig) -> None:
    good = await rig.trained("good")
    assert good.status == pb.MODEL_STATUS_ACTIVE
    rig.pipeline.passes = False
    bad = await rig.trained("bad")
    assert bad.status == pb.MODEL_STATUS_REJECTED
    assert "0.09" in bad.status_message and "0.110" in bad.status_message
    assert not bad.evaluation.passed_gate and bad.evaluation.required_precision_at_k == pytest.approx(0.11)
    assert (await rig.model(good.model_version)).status == pb.MODEL_STATUS_ACTIVE

    refused = await rpc_error(rig.activate(bad.model_version))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION and error_reason(refused) == "MODEL_REJECTED"
    no_reason = await rpc_error(rig.activate(bad.model_version, force=True))
    assert no_reason.code() == grpc.StatusCode.INVALID_ARGUMENT and "force_reason" in field_violations(
        no_reason
    )
    nul = await rpc_error(rig.activate(bad.model_version, force=True, force_reason="why\x00"))
    assert "NUL" in field_violations(nul)["force_reason"]
    forced = await rig.activate(
        bad.model_version, force=True, force_reason="baseline misleading after overhaul"
    )
    assert (
        forced.model.status == pb.MODEL_STATUS_ACTIVE and forced.previous_model_version == good.model_version
    )
    assert forced.model.forced_activation_reason == "baseline misleading after overhaul"

    # Rollback: the retired good model comes back; the forced one is retired.
    back = await rig.activate(good.model_version)
    assert back.model.status == pb.MODEL_STATUS_ACTIVE and back.previous_model_version == bad.model_version
    retired = await rig.model(bad.model_version)
    assert retired.status == pb.MODEL_STATUS_RETIRED and retired.HasField("retire_time")
    # A retired model that failed the gate still needs force; the active one is a no-op.
    assert error_reason(await rpc_error(rig.activate(bad.model_version))) == "MODEL_REJECTED"
    same = await rig.activate(good.model_version)
    assert same.previous_model_version == good.model_version


async def test_a_failing_run_leaves_the_active_model_and_says_why(rig: Rig) -> None:
    good = await rig.trained("good")
    rig.pipeline.error = TrainingError(
        "NOT_ENOUGH_INTERACTIONS", "only 3 interactions; at least 10 are needed"
    )
    queued = await rig.train("doomed")
    failed_model = await rig.worker.run_once()
    assert failed_model is not None and failed_model.status == pb.MODEL_STATUS_FAILED
    run = await rig.run(queued.training_run.training_run_id)
    assert run.state == pb.TRAINING_RUN_STATE_FAILED
    assert run.failure_reason == "NOT_ENOUGH_INTERACTIONS" and "only 3 interactions" in run.failure_message
    assert (await rig.model(good.model_version)).status == pb.MODEL_STATUS_ACTIVE
    not_trained = await rpc_error(rig.activate(queued.model.model_version))
    assert error_reason(not_trained) == "MODEL_NOT_TRAINED"
    no_evaluation = await rpc_error(
        rig.stub.GetModelEvaluation(
            pb.GetModelEvaluationRequest(model_version=queued.model.model_version), metadata=rig.auth()
        )
    )
    assert error_reason(no_evaluation) == "EVALUATION_NOT_AVAILABLE"
    # The slot is free again: the next run trains.
    rig.pipeline.error = None
    assert (await rig.trained("retry")).status == pb.MODEL_STATUS_ACTIVE


async def test_only_one_run_is_queued_however_many_ask_at_once(rig: Rig) -> None:
    results = await asyncio.gather(*(rig.train(f"race-{i}") for i in range(6)), return_exceptions=True)
    started = [r for r in results if isinstance(r, pb.TrainModelResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(started) == 1 and len(refused) == 5
    assert {error_reason(e) for e in refused} == {"TRAINING_IN_PROGRESS"}
    # The database itself refuses a second occupant of the slot.
    from services.recommendation.registry import training_runs

    def second_slot(connection: Any) -> None:
        connection.execute(
            training_runs.update().where(training_runs.c.slot.is_(None)).values(slot="training")
        )
        connection.execute(
            training_runs.insert().values(
                training_run_id="r-999999",
                model_version="m-999999",
                state=pb.TRAINING_RUN_STATE_QUEUED,
                options=b"",
                auto_activate=True,
                requested_by="test",
                create_time_us=0,
                phase=0,
                progress=0.0,
                epochs_completed=0,
                failure_reason="",
                failure_message="",
                slot="training",
            )
        )

    with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
        rig.registry.db.transaction(second_slot)


async def test_ready_without_auto_activation_then_activated(rig: Rig) -> None:
    ready = await rig.trained("manual", auto_activate=False)
    assert ready.status == pb.MODEL_STATUS_READY
    assert (await rig.registry.active()) is None
    activated = await rig.activate(ready.model_version)
    assert activated.model.status == pb.MODEL_STATUS_ACTIVE and activated.previous_model_version == ""


async def test_a_corrupt_artefact_is_refused_on_activation_and_on_load(rig: Rig) -> None:
    good = await rig.trained("good")
    ready = await rig.trained("next", auto_activate=False)
    arrays = rig.model_dir / ready.model_version / "arrays.npz"
    data = bytearray(arrays.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match=r"arrays\.npz"):
        read_artefact(rig.model_dir, ready.model_version, ready.artefact_sha256)
    refused = await rpc_error(rig.activate(ready.model_version))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_reason(refused) == "MODEL_ARTEFACT_INVALID"
    assert (await rig.model(good.model_version)).status == pb.MODEL_STATUS_ACTIVE

    # Activated behind the servicer's back, a replica refuses to load it and keeps the old one.
    holder = ActiveModel(rig.registry, rig.model_dir, b"k" * 32)
    assert (await holder.refresh()).version == good.model_version  # type: ignore[union-attr]
    await rig.registry.activate(ready.model_version, force=False, reason="")
    held = await holder.refresh()
    assert held is not None and held.version == good.model_version


async def test_two_replicas_on_one_database_and_directory_follow_activations(
    rig: Rig, start_service, database_url: str
) -> None:
    other = await start_service("recommendation", database_url)
    first = await rig.trained("first")
    second = await rig.trained("second", auto_activate=False)

    async def both_serve(version: str) -> bool:
        held = [rig.active_model(s).current() for s in (rig.service, other)]
        return all(h is not None and h.version == version for h in held)

    await wait_for(lambda: both_serve(first.model_version), "both replicas load the first model")
    other_stub = pb_grpc.RecommendationServiceStub(other.channel)
    await other_stub.ActivateModel(
        pb.ActivateModelRequest(model_version=second.model_version), metadata=other.auth()
    )
    await wait_for(lambda: both_serve(second.model_version), "both replicas load the activated model")
    await rig.activate(first.model_version)  # rollback, through the other replica
    await wait_for(lambda: both_serve(first.model_version), "both replicas roll back")


async def test_list_models_pages_newest_first_and_checks_its_input(rig: Rig) -> None:
    versions = [(await rig.trained(f"t-{i}", auto_activate=False)).model_version for i in range(3)]
    pages: list[str] = []
    token = ""
    while True:
        page = await rig.stub.ListModels(
            pb.ListModelsRequest(page_size=2, page_token=token), metadata=rig.auth()
        )
        pages.extend(m.model_version for m in page.models)
        token = page.next_page_token
        if not token:
            break
    assert pages == sorted(versions, reverse=True)
    filtered = await rig.stub.ListModels(
        pb.ListModelsRequest(statuses=[pb.MODEL_STATUS_READY], page_size=1), metadata=rig.auth()
    )
    mismatch = await rpc_error(
        rig.stub.ListModels(pb.ListModelsRequest(page_token=filtered.next_page_token), metadata=rig.auth())
    )
    assert error_reason(mismatch) == "INVALID_PAGE_TOKEN"
    bad = await rpc_error(
        rig.stub.ListModels(pb.ListModelsRequest(page_size=-1, statuses=[99]), metadata=rig.auth())
    )
    assert set(field_violations(bad)) == {"page_size", "statuses[0]"}
    missing = await rpc_error(rig.model("m-424242"))
    assert missing.code() == grpc.StatusCode.NOT_FOUND and error_reason(missing) == "MODEL_NOT_FOUND"
    no_run = await rpc_error(rig.run("r-424242"))
    assert error_reason(no_run) == "TRAINING_RUN_NOT_FOUND"


async def test_train_model_names_each_bad_option(rig: Rig) -> None:
    options = pb.TrainingOptions(
        lightfm=pb.LightFMParameters(no_components=513, epochs=-1, learning_rate=2.0),
        features=pb.FeatureScheme(
            customer_attributes=["shoe_size"],
            rating_threshold=6,
            interaction_type_weights=[
                pb.InteractionTypeWeight(interaction_type="PURCHASE", weight=4),
                pb.InteractionTypeWeight(interaction_type="HUG", weight=float("nan")),
            ],
        ),
        evaluation=pb.EvaluationProtocol(test_fraction=0.9, cold_start_fraction=0.7, k=101),
    )
    error = await rpc_error(rig.train("bad options", options=options))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error)) == {
        "request_id",
        "options.lightfm.no_components",
        "options.lightfm.epochs",
        "options.lightfm.learning_rate",
        "options.features.customer_attributes[0]",
        "options.features.rating_threshold",
        "options.features.interaction_type_weights[1].interaction_type",
        "options.features.interaction_type_weights[1].weight",
        "options.evaluation.test_fraction",
        "options.evaluation.cold_start_fraction",
        "options.evaluation.k",
    }
    assert (await rig.stub.ListModels(pb.ListModelsRequest(), metadata=rig.auth())).models == []


async def test_a_worker_stopped_during_a_run_fails_it_and_frees_the_slot(rig: Rig) -> None:
    good = await rig.trained("good")
    rig.pipeline.hold = asyncio.Event()  # never released: the run is under way when stopped
    queued = await rig.train("interrupted")
    stop = asyncio.Event()
    serving = asyncio.create_task(rig.worker.serve(stop, 0.05))

    async def running() -> bool:
        return (await rig.run(queued.training_run.training_run_id)).phase == pb.TRAINING_PHASE_FITTING

    await wait_for(running, "the run is fitting")
    stop.set()
    await serving
    run = await rig.run(queued.training_run.training_run_id)
    assert run.state == pb.TRAINING_RUN_STATE_FAILED and run.failure_reason == "WORKER_STOPPED"
    assert (await rig.model(good.model_version)).status == pb.MODEL_STATUS_ACTIVE
    rig.pipeline.hold = None
    assert (await rig.trained("after")).status == pb.MODEL_STATUS_ACTIVE


async def test_a_run_whose_worker_went_silent_is_failed_and_frees_the_slot(rig: Rig) -> None:
    from services.recommendation.registry import WORKER_LOST_AFTER_US, training_runs

    queued = await rig.train("orphan")
    claimed = await rig.registry.claim_next()
    assert claimed is not None and claimed.training_run_id == queued.training_run.training_run_id
    # Its worker died long ago: the heartbeat is older than the limit.
    rig.registry.db.transaction(
        lambda c: c.execute(
            training_runs.update().values(heartbeat_us=claimed.start_time_us - WORKER_LOST_AFTER_US - 1)
        )
    )
    # TrainModel finds the slot free again (as would the next worker's poll).
    following = await rig.train("next")
    run = await rig.run(claimed.training_run_id)
    assert run.state == pb.TRAINING_RUN_STATE_FAILED and run.failure_reason == "WORKER_LOST"
    assert (await rig.model(claimed.model_version)).status == pb.MODEL_STATUS_FAILED
    assert await rig.worker.run_once() is not None
    assert (await rig.model(following.model.model_version)).status == pb.MODEL_STATUS_ACTIVE
