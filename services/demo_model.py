"""The first recommendation model on the demo data: `make run` trains and activates one,
so that Recommend (for demo-aiko, say) is personalised and explained out of the box.

Once the demo data is loaded, unless a model is ACTIVE already, it waits until the recommender's interaction copy has caught up with profile's
interaction feed (the copy's cursor, read from the recommender's database, has nothing
after it on ListInteractions), then calls TrainModel with the default options (the model
auto-activates when it passes the gate) and follows the run until it ends, saying so on
the console. Its request id is derived from the copy's cursor, so a second start with the
same data finds the same run instead of queueing another. While another run is queued or
running (TRAINING_IN_PROGRESS; a run left by a stopped worker is failed by the worker's
next claim), it retries for BUSY_SECONDS.

It runs in a thread beside the launcher: the suite is ready (banner printed) before the
model is; until then Recommend answers with popular items (fallback NO_MODEL).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc
from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.profile.v1 import profile_service_pb2_grpc as profile_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.interactions import read_cursor
from shared.db import Database
from shared.settings import Settings

CALL_TIMEOUT = 30.0
CATCH_UP_SECONDS = 120.0  # then it trains on what the copy holds
RUN_SECONDS = 900.0  # a run still going after this is left to itself (GetTrainingRun shows it)
POLL_SECONDS = 0.5
BUSY_SECONDS = 30.0
REQUEST_PREFIX = "demo-first-model-"


@dataclass(frozen=True)
class Outcome:
    """What became of the first model: its version and status, or why there is none."""

    model_version: str = ""
    status: pb.ModelStatus.ValueType = pb.MODEL_STATUS_UNSPECIFIED
    message: str = ""
    seconds: float = 0.0
    skipped: bool = False  # a model was active already: nothing was queued

    def line(self) -> str:
        status = pb.ModelStatus.Name(self.status).removeprefix("MODEL_STATUS_")
        if self.skipped:
            return f"recommendation model {self.model_version} is {status}"
        if self.status == pb.MODEL_STATUS_ACTIVE:
            return (
                f"first recommendation model {self.model_version} ACTIVE after {self.seconds:.1f} s: "
                "Recommend is personalised now (e.g. for demo-aiko)"
            )
        if self.model_version:
            return f"first recommendation model {self.model_version} {status}: {self.message}"
        return f"no first recommendation model: {self.message}"


class FirstModel:
    """Trains the first model through the running suite's RPCs (see the module docstring)."""

    def __init__(
        self,
        addresses: Mapping[str, str],
        tokens: Mapping[str, str],
        settings: Settings,
        stop: threading.Event,
    ):
        self.addresses = addresses
        self.admin = (("authorization", f"Bearer {tokens['admin']}"),)
        # Reading the feed as the recommender does: it alone may call ListInteractions.
        self.recommender = (("authorization", f"Bearer {tokens['service:recommendation']}"),)
        self.database_url = settings.effective_database_url
        self.stop = stop

    def _active(self, models: pb_grpc.RecommendationServiceStub) -> pb.Model | None:
        listed = models.ListModels(
            pb.ListModelsRequest(page_size=1, statuses=[pb.MODEL_STATUS_ACTIVE]),
            metadata=self.admin,
            timeout=CALL_TIMEOUT,
        )
        return listed.models[0] if listed.models else None

    def _queue(self, models: pb_grpc.RecommendationServiceStub, request_id: str) -> pb.TrainModelResponse:
        """TrainModel, again while another run is in progress (for at most BUSY_SECONDS)."""
        deadline = time.monotonic() + BUSY_SECONDS
        while True:
            try:
                return models.TrainModel(
                    pb.TrainModelRequest(request_id=request_id), metadata=self.admin, timeout=CALL_TIMEOUT
                )
            except grpc.RpcError as error:
                busy = error.code() == grpc.StatusCode.FAILED_PRECONDITION
                if not busy or time.monotonic() > deadline or self.stop.wait(1.0):
                    raise

    def _caught_up(self) -> str:
        """Waits (at most CATCH_UP_SECONDS) until the copy has every feed entry; its cursor."""
        deadline = time.monotonic() + CATCH_UP_SECONDS
        database = Database(self.database_url, "recommendation")
        try:
            with grpc.insecure_channel(self.addresses["profile"]) as channel:
                return self._follow(database, profile_grpc.ProfileServiceStub(channel), deadline)
        finally:
            database.close()

    def _follow(self, database: Database, feed: profile_grpc.ProfileServiceStub, deadline: float) -> str:
        while True:
            cursor = asyncio.run(database.read(read_cursor))  # the copy's position in the feed
            page = feed.ListInteractions(
                profile_pb.ListInteractionsRequest(since_cursor=cursor, page_size=1),
                metadata=self.recommender,
                timeout=CALL_TIMEOUT,
            )
            if not page.entries or time.monotonic() > deadline or self.stop.wait(POLL_SECONDS):
                return cursor

    def train(self) -> Outcome:
        started = time.monotonic()
        with grpc.insecure_channel(self.addresses["recommendation"]) as channel:
            models = pb_grpc.RecommendationServiceStub(channel)
            active = self._active(models)
            if active is not None:
                return Outcome(active.model_version, active.status, skipped=True)
            cursor = self._caught_up()
            queued = self._queue(models, REQUEST_PREFIX + hashlib.sha256(cursor.encode()).hexdigest()[:16])
            run_id = queued.training_run.training_run_id
            deadline = time.monotonic() + RUN_SECONDS
            finished = (pb.TRAINING_RUN_STATE_SUCCEEDED, pb.TRAINING_RUN_STATE_FAILED)
            while True:
                run = models.GetTrainingRun(
                    pb.GetTrainingRunRequest(training_run_id=run_id),
                    metadata=self.admin,
                    timeout=CALL_TIMEOUT,
                ).training_run
                if run.state in finished or time.monotonic() > deadline or self.stop.wait(POLL_SECONDS):
                    break
            if run.state == pb.TRAINING_RUN_STATE_FAILED:
                return Outcome(message=f"the run failed: {run.failure_reason}: {run.failure_message}")
            if run.state != pb.TRAINING_RUN_STATE_SUCCEEDED:
                return Outcome(message=f"still training ({run_id}); GetTrainingRun follows it")
            model = models.GetModel(
                pb.GetModelRequest(model_version=queued.model.model_version),
                metadata=self.admin,
                timeout=CALL_TIMEOUT,
            ).model
        return Outcome(model.model_version, model.status, model.status_message, time.monotonic() - started)


def train_first_model_in_background(
    addresses: Mapping[str, str],
    tokens: Mapping[str, str],
    settings: Settings,
    stop: threading.Event,
    say: Callable[[str], None],
) -> threading.Thread:
    """Starts a daemon thread that trains the first model and says what became of it
    (`say` is the launcher's: it says nothing once the launcher is stopping)."""

    def work() -> None:
        try:
            outcome = FirstModel(addresses, tokens, settings, stop).train()
        except grpc.RpcError as error:
            outcome = Outcome(message=f"{error.code().name}: {error.details()}")
        say(f"  {outcome.line()}")

    thread = threading.Thread(target=work, name="first-model", daemon=True)
    thread.start()
    return thread
