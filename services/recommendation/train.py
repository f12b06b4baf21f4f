"""`python -m services.recommendation.train` (console script `najimi-recommendation-train`).

Without arguments: runs the queued training run, or, when none is queued, queues one with
the default options and runs it, showing a progress bar; exits 0 when the run succeeded
(its model READY, ACTIVE or REJECTED) and 1 when it failed. This is what the Kubernetes
CronJob runs. With --worker: polls the queue and runs each run TrainModel queues until
SIGTERM or SIGINT (what `make run` starts beside the services).

It reads the same NAJIMI_* settings as the recommendation service (database, model
directory, addresses) and never migrates: it waits until the service has brought the
schema to the newest revision.
"""

from __future__ import annotations

from shared import stop_signals

if __name__ == "__main__":
    stop_signals.install()  # before the slow imports: SIGTERM or SIGINT from here on is a clean stop

import argparse
import asyncio
import sys
from typing import Any

from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from tqdm import tqdm

from services.recommendation.app import MIGRATIONS
from services.recommendation.registry import ModelRegistry, TrainingRun
from services.recommendation.training_worker import TrainingWorker, default_pipeline
from shared.db import Database
from shared.errors import FailedPrecondition
from shared.idempotency import Idempotency
from shared.log import configure_logging, get_logger
from shared.migrate import wait_for_schema
from shared.server import tune_garbage_collector
from shared.settings import Settings, load_settings

log = get_logger("najimi.recommendation.train")
POLL_SECONDS = 1.0
CLI_PRINCIPAL = "cli:najimi-recommendation-train"


class ProgressBar:
    """A tqdm bar over the whole run (0-100 %), its description the phase."""

    def __init__(self) -> None:
        self.bar = tqdm(total=100, unit="%", bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}]")

    def __call__(self, run: TrainingRun, progress: Any) -> None:
        self.bar.set_description(f"{run.model_version} {progress.phase.lower().replace('_', ' ')}")
        self.bar.n = round(100 * float(progress.fraction), 1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


async def train_once(registry: ModelRegistry, worker: TrainingWorker, request_id: str) -> int:
    run = await registry.claim_next()
    if run is None:
        try:
            queued, _ = await registry.queue_training(
                CLI_PRINCIPAL, pb.TrainModelRequest(request_id=request_id), pb.TrainingOptions(), True
            )
        except FailedPrecondition as error:  # another run is RUNNING: this one is not needed
            print(f"not started: {error}", file=sys.stderr)
            return 1
        run = await registry.claim_next()
        if run is None or run.training_run_id != queued.training_run_id:
            print("not started: another worker took the run", file=sys.stderr)
            return 1
    model = await worker.train(run)
    finished = await registry.get_run(run.training_run_id)
    status = pb.ModelStatus.Name(model.status).removeprefix("MODEL_STATUS_")
    print(f"{finished.training_run_id}: model {model.model_version} {status}: {model.status_message}")
    return 0 if finished.state == pb.TRAINING_RUN_STATE_SUCCEEDED else 1


async def run(settings: Settings, worker_mode: bool, request_id: str) -> int:
    stop = asyncio.Event()
    database = Database(settings.effective_database_url, "recommendation")
    try:
        with stop_signals.setting(asyncio.get_running_loop(), stop):
            if not await wait_for_schema(database, MIGRATIONS, stop):
                return 0
            registry = ModelRegistry(database, Idempotency.from_settings(settings))
            run_training, make_source = default_pipeline(settings, database)
            if worker_mode:
                worker = TrainingWorker(registry, settings.effective_model_dir, run_training, make_source)
                log.info("training_worker_started", model_dir=str(settings.effective_model_dir))
                await worker.serve(stop, POLL_SECONDS)
                return 0
            bar = ProgressBar()
            worker = TrainingWorker(registry, settings.effective_model_dir, run_training, make_source, bar)
            try:
                training = asyncio.create_task(train_once(registry, worker, request_id))
                stopping = asyncio.create_task(stop.wait())
                await asyncio.wait({training, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not training.done():  # stopped: the run is failed by the next claim (WORKER_LOST)
                    training.cancel()
                    return 1
                stopping.cancel()
                return training.result()
            finally:
                bar.close()
    finally:
        database.close()


def main(argv: list[str] | None = None) -> None:
    stop_signals.install()
    parser = argparse.ArgumentParser(
        prog="python -m services.recommendation.train", description=__doc__.split("\n\n")[1]
    )
    parser.add_argument("--worker", action="store_true", help="poll the queue and run every queued run")
    parser.add_argument(
        "--request-id",
        default="",
        help="request id of the run queued when none waits (a retry with the same id runs nothing new)",
    )
    args = parser.parse_args(argv)
    settings = load_settings("recommendation")
    configure_logging(settings.log_format, settings.log_level)
    tune_garbage_collector()
    request_id = args.request_id or f"cli-{__import__('uuid').uuid4().hex}"
    try:
        code = asyncio.run(run(settings, args.worker, request_id))
    finally:
        stop_signals.ignore()
    sys.exit(code)


if __name__ == "__main__":
    main()
