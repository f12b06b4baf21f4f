"""`python -m services.recommendation.train` as a process: the command-line run (progress
bar, exit status) and the --worker mode that `make run` starts, against a real database.

The pipeline here is whatever services/recommendation/training/ provides (none yet, or
the real one without a profile service to pull from): either way the run fails, and what
these tests check is the process around it: the run is taken, it ends FAILED with a
readable reason, and the process exits as it should.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.app import MIGRATIONS
from services.recommendation.registry import ModelRegistry, TrainingRun
from shared.db import Database
from shared.idempotency import Idempotency
from shared.processes import ServiceProcess

DEADLINE_SECONDS = 60.0


def migrated(database_url: str) -> Database:
    database = Database(database_url, "recommendation", MIGRATIONS)
    database.migrate()
    return database


def environment(tmp_path: Path, database_url: str) -> dict[str, str]:
    return {
        "NAJIMI_DATA_DIR": str(tmp_path),
        "NAJIMI_DATABASE_URL": database_url,
        # Nothing listens here: a pipeline that calls profile fails fast instead of waiting.
        "NAJIMI_PROFILE_ADDRESS": "127.0.0.1:1",
        "NAJIMI_CONSENT_ADDRESS": "127.0.0.1:1",
        "NAJIMI_CLIENT_TIMEOUT_SECONDS": "2",
    }


async def test_the_command_line_queues_and_runs_one_training_and_reports_how_it_ended(database_url, tmp_path):
    database = migrated(database_url)
    try:
        finished = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "services.recommendation.train", "--request-id", "cli-1"],
            env={**os.environ, **environment(tmp_path, database_url)},
            capture_output=True,
            text=True,
            timeout=DEADLINE_SECONDS * 3,
        )
        registry = ModelRegistry(database, Idempotency(b"k" * 32, 168))
        run = await registry.get_run("r-000001")
    finally:
        database.close()
    assert run.requested_by == "cli:najimi-recommendation-train"
    assert run.state == pb.TRAINING_RUN_STATE_FAILED and run.failure_reason and run.failure_message
    assert finished.returncode == 1, finished.stderr[-2000:]
    assert f"r-000001: model m-000001 FAILED: {run.failure_message}" in finished.stdout
    assert "%|" in finished.stderr  # the progress bar


async def test_the_worker_takes_queued_runs_until_stopped(database_url, tmp_path):
    database = migrated(database_url)
    registry = ModelRegistry(database, Idempotency(b"k" * 32, 168))
    worker = ServiceProcess(
        "recommendation.train",
        environment(tmp_path, database_url),
        tmp_path / "worker.log",
        args=["--worker"],
    )
    try:
        queued, _ = await registry.queue_training(
            "admin", pb.TrainModelRequest(request_id="w-1"), pb.TrainingOptions(), True
        )
        deadline = time.monotonic() + DEADLINE_SECONDS * 3
        run: TrainingRun = queued
        while run.state in (pb.TRAINING_RUN_STATE_QUEUED, pb.TRAINING_RUN_STATE_RUNNING):
            assert time.monotonic() < deadline, "".join(worker.lines[-20:])
            await asyncio.sleep(0.1)
            run = await registry.get_run(queued.training_run_id)
        assert run.state == pb.TRAINING_RUN_STATE_FAILED and run.failure_reason, run
        assert (await registry.get_model(queued.model_version)).status == pb.MODEL_STATUS_FAILED
    finally:
        code = worker.terminate()
        database.close()
    assert code == 0, "".join(worker.lines[-20:])
    assert any('"training_worker_started"' in line for line in worker.lines)
