"""The model registry: training runs and model versions, their life cycles, in the store.

A run is QUEUED by TrainModel, claimed (RUNNING) by a training worker, and ends
SUCCEEDED or FAILED; its model goes TRAINING -> READY | ACTIVE | REJECTED, or FAILED.
ActivateModel moves the active model to RETIRED and another one to ACTIVE in one
transaction. The database enforces the two singletons (see migration 0004): at most one
run QUEUED or RUNNING, at most one model ACTIVE. Which version is active is read from
here by every replica (active_model.py), never from the model directory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from sqlalchemy.engine import Connection

from shared.db import Database, now_micros
from shared.errors import FailedPrecondition, NotFound
from shared.idempotency import Idempotency

TRAIN_MODEL = "TrainModel"
TRAINING_SLOT = "training"
ACTIVE_SLOT = "active"
# A RUNNING run whose worker has not reported for this long is failed (WORKER_LOST), so a
# crashed worker cannot hold the one training slot for ever.
WORKER_LOST_AFTER_US = 10 * 60 * 1_000_000
NUMBER = re.compile(r"^[mr]-(\d+)$")

metadata = sa.MetaData()
training_runs = sa.Table(
    "training_runs",
    metadata,
    sa.Column("training_run_id", sa.String(32), primary_key=True),
    sa.Column("model_version", sa.String(32), nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("options", sa.LargeBinary, nullable=False),
    sa.Column("auto_activate", sa.Boolean, nullable=False),
    sa.Column("requested_by", sa.String(160), nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("start_time_us", sa.BigInteger),
    sa.Column("end_time_us", sa.BigInteger),
    sa.Column("heartbeat_us", sa.BigInteger),
    sa.Column("phase", sa.Integer, nullable=False),
    sa.Column("progress", sa.Float, nullable=False),
    sa.Column("epochs_completed", sa.Integer, nullable=False),
    sa.Column("eta_seconds", sa.Float),
    sa.Column("failure_reason", sa.String(64), nullable=False),
    sa.Column("failure_message", sa.Text, nullable=False),
    sa.Column("slot", sa.String(16)),
)
models = sa.Table(
    "models",
    metadata,
    sa.Column("model_version", sa.String(32), primary_key=True),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("training_run_id", sa.String(32), nullable=False),
    sa.Column("options", sa.LargeBinary, nullable=False),
    sa.Column("training_data", sa.LargeBinary),
    sa.Column("evaluation", sa.LargeBinary),
    sa.Column("passed_gate", sa.Boolean),
    sa.Column("status_message", sa.Text, nullable=False),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
    sa.Column("activate_time_us", sa.BigInteger),
    sa.Column("retire_time_us", sa.BigInteger),
    sa.Column("forced_activation_reason", sa.Text, nullable=False),
    sa.Column("library_versions", sa.Text, nullable=False),
    sa.Column("artefact_sha256", sa.String(64), nullable=False),
    sa.Column("slot", sa.String(16)),
)


@dataclass(frozen=True)
class TrainingRun:
    training_run_id: str
    model_version: str
    state: pb.TrainingRunState.ValueType
    options: pb.TrainingOptions
    auto_activate: bool
    requested_by: str
    create_time_us: int
    start_time_us: int | None
    end_time_us: int | None
    phase: pb.TrainingPhase.ValueType
    progress: float
    epochs_completed: int
    eta_seconds: float | None
    failure_reason: str
    failure_message: str


@dataclass(frozen=True)
class Model:
    model_version: str
    status: pb.ModelStatus.ValueType
    training_run_id: str
    options: pb.TrainingOptions
    training_data: pb.TrainingData | None
    evaluation: pb.ModelEvaluation | None
    passed_gate: bool | None
    status_message: str
    create_time_us: int
    update_time_us: int
    activate_time_us: int | None
    retire_time_us: int | None
    forced_activation_reason: str
    library_versions: dict[str, str]
    artefact_sha256: str


@dataclass(frozen=True)
class Finished:
    """What a successful run hands the registry (the worker builds it from the outcome)."""

    evaluation: pb.ModelEvaluation
    passed_gate: bool
    gate_message: str
    options: pb.TrainingOptions
    training_data: pb.TrainingData
    library_versions: dict[str, str] = field(default_factory=dict)
    artefact_sha256: str = ""


@dataclass(frozen=True)
class Activation:
    model: Model
    previous_model_version: str


def _message(kind: type[Any], stored: bytes | None) -> Any:
    return None if stored is None else kind.FromString(bytes(stored))


def _run(row: sa.Row[Any]) -> TrainingRun:
    return TrainingRun(
        training_run_id=row.training_run_id,
        model_version=row.model_version,
        state=row.state,
        options=pb.TrainingOptions.FromString(bytes(row.options)),
        auto_activate=bool(row.auto_activate),
        requested_by=row.requested_by,
        create_time_us=row.create_time_us,
        start_time_us=row.start_time_us,
        end_time_us=row.end_time_us,
        phase=row.phase,
        progress=row.progress,
        epochs_completed=row.epochs_completed,
        eta_seconds=row.eta_seconds,
        failure_reason=row.failure_reason,
        failure_message=row.failure_message,
    )


def _model(row: sa.Row[Any]) -> Model:
    return Model(
        model_version=row.model_version,
        status=row.status,
        training_run_id=row.training_run_id,
        options=pb.TrainingOptions.FromString(bytes(row.options)),
        training_data=_message(pb.TrainingData, row.training_data),
        evaluation=_message(pb.ModelEvaluation, row.evaluation),
        passed_gate=row.passed_gate,
        status_message=row.status_message,
        create_time_us=row.create_time_us,
        update_time_us=row.update_time_us,
        activate_time_us=row.activate_time_us,
        retire_time_us=row.retire_time_us,
        forced_activation_reason=row.forced_activation_reason,
        library_versions=json.loads(row.library_versions),
        artefact_sha256=row.artefact_sha256,
    )


def model_not_found(version: str) -> NotFound:
    return NotFound(
        f"model {version} does not exist", reason="MODEL_NOT_FOUND", metadata={"model_version": version}
    )


def _next_number(connection: Connection) -> int:
    """One more than the highest run number so far (a race is a key conflict, re-run)."""
    ids = connection.execute(sa.select(training_runs.c.training_run_id)).scalars()
    return max((int(m.group(1)) for i in ids if (m := NUMBER.match(i))), default=0) + 1


class ModelRegistry:
    def __init__(self, database: Database, idempotency: Idempotency):
        self.db = database
        self.idempotency = idempotency

    # --- training runs -------------------------------------------------------------

    async def queue_training(
        self, principal: str, request: pb.TrainModelRequest, options: pb.TrainingOptions, auto_activate: bool
    ) -> tuple[TrainingRun, Model]:
        """Queues a run and its model (TRAINING); a known request id returns the first ones,
        as they are now. FAILED_PRECONDITION TRAINING_IN_PROGRESS while another run holds
        the slot."""

        def work(connection: Connection) -> bytes:
            _fail_lost_runs(connection, now_micros())
            busy = connection.execute(
                sa.select(training_runs.c.training_run_id).where(training_runs.c.slot == TRAINING_SLOT)
            ).scalar()
            if busy is not None:
                raise FailedPrecondition(
                    f"training run {busy} is still queued or running; at most one runs at a time",
                    reason="TRAINING_IN_PROGRESS",
                    metadata={"training_run_id": busy},
                )
            number = _next_number(connection)
            run_id, version = f"r-{number:06d}", f"m-{number:06d}"
            now = now_micros()
            serialized = options.SerializeToString(deterministic=True)
            connection.execute(
                training_runs.insert().values(
                    training_run_id=run_id,
                    model_version=version,
                    state=pb.TRAINING_RUN_STATE_QUEUED,
                    options=serialized,
                    auto_activate=auto_activate,
                    requested_by=principal,
                    create_time_us=now,
                    phase=pb.TRAINING_PHASE_UNSPECIFIED,
                    progress=0.0,
                    epochs_completed=0,
                    failure_reason="",
                    failure_message="",
                    slot=TRAINING_SLOT,
                )
            )
            connection.execute(
                models.insert().values(
                    model_version=version,
                    status=pb.MODEL_STATUS_TRAINING,
                    training_run_id=run_id,
                    options=serialized,
                    status_message="queued for training",
                    create_time_us=now,
                    update_time_us=now,
                    forced_activation_reason="",
                    library_versions="{}",
                    artefact_sha256="",
                )
            )
            return run_id.encode()

        run_id = (
            await self.db.write(lambda c: self.idempotency.once(c, principal, TRAIN_MODEL, request, work))
        ).decode()
        run = await self.get_run(run_id)
        return run, await self.get_model(run.model_version)

    async def get_run(self, run_id: str) -> TrainingRun:
        def query(connection: Connection) -> sa.Row[Any] | None:
            return connection.execute(
                sa.select(training_runs).where(training_runs.c.training_run_id == run_id)
            ).first()

        row = await self.db.read(query)
        if row is None:
            raise NotFound(
                f"training run {run_id} does not exist",
                reason="TRAINING_RUN_NOT_FOUND",
                metadata={"training_run_id": run_id},
            )
        return _run(row)

    async def claim_next(self) -> TrainingRun | None:
        """Marks the queued run RUNNING and returns it (None when none waits). A RUNNING run
        whose worker went silent is failed first (WORKER_LOST), freeing the slot."""

        def work(connection: Connection) -> sa.Row[Any] | None:
            now = now_micros()
            _fail_lost_runs(connection, now)
            row = connection.execute(
                sa.select(training_runs)
                .where(training_runs.c.state == pb.TRAINING_RUN_STATE_QUEUED)
                .order_by(training_runs.c.create_time_us)
                .limit(1)
                .with_for_update(skip_locked=True)
            ).first()
            if row is None:
                return None
            # Only the worker whose update finds the row still QUEUED takes it.
            taken = connection.execute(
                training_runs.update()
                .where(
                    training_runs.c.training_run_id == row.training_run_id,
                    training_runs.c.state == pb.TRAINING_RUN_STATE_QUEUED,
                )
                .values(
                    state=pb.TRAINING_RUN_STATE_RUNNING,
                    start_time_us=now,
                    heartbeat_us=now,
                    phase=pb.TRAINING_PHASE_PULLING_DATA,
                )
            ).rowcount
            if not taken:
                return None
            return connection.execute(
                sa.select(training_runs).where(training_runs.c.training_run_id == row.training_run_id)
            ).first()

        row = await self.db.write(work)
        return None if row is None else _run(row)

    async def report_progress(
        self, run_id: str, phase: int, progress: float, epochs_completed: int, eta_seconds: float | None
    ) -> None:
        def work(connection: Connection) -> None:
            connection.execute(
                training_runs.update()
                .where(
                    training_runs.c.training_run_id == run_id,
                    training_runs.c.state == pb.TRAINING_RUN_STATE_RUNNING,
                )
                .values(
                    phase=phase,
                    progress=min(max(progress, 0.0), 1.0),
                    epochs_completed=epochs_completed,
                    eta_seconds=eta_seconds,
                    heartbeat_us=now_micros(),
                )
            )

        await self.db.write(work)

    async def fail(self, run_id: str, reason: str, message: str) -> None:
        """The run FAILED with a readable error; its model FAILED; the active model untouched."""
        await self.db.write(lambda c: _fail(c, run_id, reason, message, now_micros()))

    async def succeed(self, run: TrainingRun, finished: Finished) -> Model:
        """Records the evaluated model: REJECTED when it failed the gate, else READY, or
        ACTIVE (the active one RETIRED) when the run auto-activates."""

        def work(connection: Connection) -> None:
            now = now_micros()
            status = pb.MODEL_STATUS_READY if finished.passed_gate else pb.MODEL_STATUS_REJECTED
            connection.execute(
                models.update()
                .where(models.c.model_version == run.model_version)
                .values(
                    status=status,
                    options=finished.options.SerializeToString(deterministic=True),
                    training_data=finished.training_data.SerializeToString(deterministic=True),
                    evaluation=finished.evaluation.SerializeToString(deterministic=True),
                    passed_gate=finished.passed_gate,
                    status_message=finished.gate_message,
                    update_time_us=now,
                    library_versions=json.dumps(finished.library_versions, sort_keys=True),
                    artefact_sha256=finished.artefact_sha256,
                )
            )
            if finished.passed_gate and run.auto_activate:
                _activate(connection, run.model_version, now, "")
            connection.execute(
                training_runs.update()
                .where(training_runs.c.training_run_id == run.training_run_id)
                .values(
                    state=pb.TRAINING_RUN_STATE_SUCCEEDED,
                    options=finished.options.SerializeToString(deterministic=True),
                    end_time_us=now,
                    phase=pb.TRAINING_PHASE_UNSPECIFIED,
                    progress=1.0,
                    eta_seconds=None,
                    slot=None,
                )
            )

        await self.db.write(work)
        return await self.get_model(run.model_version)

    # --- models ------------------------------------------------------------------

    async def get_model(self, version: str) -> Model:
        def query(connection: Connection) -> sa.Row[Any] | None:
            return connection.execute(sa.select(models).where(models.c.model_version == version)).first()

        row = await self.db.read(query)
        if row is None:
            raise model_not_found(version)
        return _model(row)

    async def list_models(self, before: str, limit: int, statuses: Sequence[int]) -> tuple[list[Model], bool]:
        """Up to `limit` models with versions below `before` ("" for the newest), newest first,
        and whether more follow."""

        def query(connection: Connection) -> list[sa.Row[Any]]:
            select = sa.select(models)
            if before:
                select = select.where(models.c.model_version < before)
            if statuses:
                select = select.where(models.c.status.in_(list(statuses)))
            return list(connection.execute(select.order_by(models.c.model_version.desc()).limit(limit + 1)))

        rows = await self.db.read(query)
        return [_model(row) for row in rows[:limit]], len(rows) > limit

    async def active(self) -> tuple[str, str] | None:
        """(version, artefact checksum) of the active model, or None."""

        def query(connection: Connection) -> tuple[str, str] | None:
            row = connection.execute(
                sa.select(models.c.model_version, models.c.artefact_sha256).where(
                    models.c.slot == ACTIVE_SLOT
                )
            ).first()
            return None if row is None else (row.model_version, row.artefact_sha256)

        return await self.db.read(query)

    async def activate(self, version: str, force: bool, reason: str) -> Activation:
        """Activates a READY model, a RETIRED one that passed the gate (rollback), or, with
        force, a REJECTED (or retired, gate-failed) one; activating the active one is a no-op."""

        def work(connection: Connection) -> str:
            row = connection.execute(sa.select(models).where(models.c.model_version == version)).first()
            if row is None:
                raise model_not_found(version)
            if row.status == pb.MODEL_STATUS_ACTIVE:
                return version
            if row.status in (pb.MODEL_STATUS_TRAINING, pb.MODEL_STATUS_FAILED):
                raise FailedPrecondition(
                    f"model {version} is {pb.ModelStatus.Name(row.status)}: it has no trained artefact",
                    reason="MODEL_NOT_TRAINED",
                    metadata={"model_version": version},
                )
            if not row.passed_gate and not force:
                raise FailedPrecondition(
                    f"model {version} did not pass the gate ({row.status_message}); activate it with "
                    "force and a force_reason",
                    reason="MODEL_REJECTED",
                    metadata={"model_version": version},
                )
            return _activate(
                connection, version, now_micros(), reason if force and not row.passed_gate else ""
            )

        previous = await self.db.write(work)
        return Activation(await self.get_model(version), previous)


def _activate(connection: Connection, version: str, now: int, forced_reason: str) -> str:
    """Retires the active model (if any) and activates `version`; returns the previous version."""
    previous = connection.execute(
        sa.select(models.c.model_version).where(models.c.slot == ACTIVE_SLOT).with_for_update()
    ).scalar()
    if previous is not None:
        connection.execute(
            models.update()
            .where(models.c.model_version == previous)
            .values(status=pb.MODEL_STATUS_RETIRED, slot=None, retire_time_us=now, update_time_us=now)
        )
    connection.execute(
        models.update()
        .where(models.c.model_version == version)
        .values(
            status=pb.MODEL_STATUS_ACTIVE,
            slot=ACTIVE_SLOT,
            activate_time_us=now,
            update_time_us=now,
            forced_activation_reason=forced_reason,
        )
    )
    return previous or ""


def _fail_lost_runs(connection: Connection, now: int) -> None:
    """Fails the RUNNING runs whose worker stopped reporting (WORKER_LOST), freeing the slot."""
    lost = connection.execute(
        sa.select(training_runs.c.training_run_id).where(
            training_runs.c.state == pb.TRAINING_RUN_STATE_RUNNING,
            training_runs.c.heartbeat_us < now - WORKER_LOST_AFTER_US,
        )
    ).scalars()
    for run_id in list(lost):
        _fail(connection, run_id, "WORKER_LOST", "the training worker stopped reporting for 10 minutes", now)


def _fail(connection: Connection, run_id: str, reason: str, message: str, now: int) -> None:
    version = connection.execute(
        training_runs.update()
        .where(
            training_runs.c.training_run_id == run_id,
            training_runs.c.state.in_([pb.TRAINING_RUN_STATE_QUEUED, pb.TRAINING_RUN_STATE_RUNNING]),
        )
        .values(
            state=pb.TRAINING_RUN_STATE_FAILED,
            end_time_us=now,
            phase=pb.TRAINING_PHASE_UNSPECIFIED,
            eta_seconds=None,
            failure_reason=reason,
            failure_message=message,
            slot=None,
        )
        .returning(training_runs.c.model_version)
    ).scalar()
    if version is not None:
        connection.execute(
            models.update()
            .where(models.c.model_version == version)
            .values(status=pb.MODEL_STATUS_FAILED, status_message=message, update_time_us=now)
        )
