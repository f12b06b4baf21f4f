"""Training through the service: consent, profile and recommendation as real processes
with a training worker, on SQLite and PostgreSQL.

A generated dataset with planted structure (customers' tastes follow their segment, which
shows in their attributes) is loaded through the RPCs (training/synthetic_loading.py); one
customer is erased through consent's data-subject request; once the recommender's
interaction copy holds everything else, TrainModel runs and the activated model must beat
popularity on warm and on cold-start customers, and know nothing of the erased customer.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from najimi.consent.v1 import consent_service_pb2 as consent_pb
from najimi.consent.v1 import consent_service_pb2_grpc as consent_grpc
from najimi.recommendation.v1 import recommendation_service_pb2 as pb
from najimi.recommendation.v1 import recommendation_service_pb2_grpc as pb_grpc

from services.recommendation.artefacts import read_artefact
from services.recommendation.interactions import all_interactions
from services.recommendation.training.synthetic import Shape, generate
from services.recommendation.training.synthetic_loading import Addresses, load
from shared.db import Database
from shared.processes import ServiceProcess
from tests.e2e.conftest import Suite

SHAPE = Shape(customers=250, items=350, interactions=10_000)
ERASED = "cust-00000"
DEADLINE_SECONDS = 120


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def training_suite(request, tmp_path: Path) -> Iterator[Suite]:
    database_url = ""
    if request.param == "postgresql":
        database_url = request.getfixturevalue("postgres_cluster").create_database(
            f"train_{uuid.uuid4().hex[:12]}"
        )
    suite = Suite(tmp_path, database_url=database_url).start_all()
    # The worker `make run` starts beside the services, with recommendation's settings.
    worker = ServiceProcess(
        "recommendation.train",
        suite.env_for("recommendation"),
        tmp_path / "training.log",
        args=["--worker"],
    )
    try:
        yield suite
    finally:
        assert worker.terminate() == 0
        suite.stop_all()


def copy_of(suite: Suite) -> list:
    """The recommender's interaction copy, read from its database."""
    url = suite.database_url or f"sqlite:///{suite.data_dir / 'recommendation.db'}"
    database = Database(url, "recommendation")
    try:
        return asyncio.run(database.read(all_interactions))
    finally:
        database.close()


def erase(suite: Suite, customer_id: str) -> None:
    crm = suite.auth("service:crm")
    with grpc.insecure_channel(suite.address("consent")) as channel:
        stub = consent_grpc.ConsentServiceStub(channel)
        created = stub.CreateDataSubjectRequest(
            consent_pb.CreateDataSubjectRequestRequest(
                customer_id=customer_id, type=consent_pb.DATA_SUBJECT_REQUEST_TYPE_ERASE, request_id="erase-1"
            ),
            metadata=crm,
            timeout=10,
        ).data_subject_request
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            found = stub.GetDataSubjectRequest(
                consent_pb.GetDataSubjectRequestRequest(
                    data_subject_request_id=created.data_subject_request_id
                ),
                metadata=crm,
                timeout=10,
            ).data_subject_request
            if found.state == consent_pb.DATA_SUBJECT_REQUEST_STATE_SUCCEEDED:
                return
            assert found.state != consent_pb.DATA_SUBJECT_REQUEST_STATE_FAILED, found
            assert time.monotonic() < deadline, f"erasure not done: {found}"
            time.sleep(0.2)


def test_a_model_trained_through_the_service_beats_popularity(training_suite: Suite):
    suite = training_suite
    data = generate(SHAPE)
    addresses = Addresses(suite.address("consent"), suite.address("profile"), suite.address("recommendation"))
    asyncio.run(load(data, addresses, suite.tokens))
    erase(suite, ERASED)

    # The copy follows profile's feed: wait until it holds every interaction but the erased customer's.
    expected = sum(1 for i in data.interactions if i.customer_id != ERASED)
    deadline = time.monotonic() + DEADLINE_SECONDS
    while len(held := copy_of(suite)) != expected:
        assert time.monotonic() < deadline, f"the copy holds {len(held)} of {expected} interactions"
        time.sleep(0.5)
    assert ERASED not in {i.customer_id for i in held}

    admin = suite.auth()
    with grpc.insecure_channel(suite.address("recommendation")) as channel:
        stub = pb_grpc.RecommendationServiceStub(channel)
        started = stub.TrainModel(
            pb.TrainModelRequest(
                request_id="train-1",
                options=pb.TrainingOptions(
                    evaluation=pb.EvaluationProtocol(random_seed=7, cold_start_fraction=0.2)
                ),
            ),
            metadata=admin,
            timeout=10,
        )
        run_id = started.training_run.training_run_id
        deadline = time.monotonic() + DEADLINE_SECONDS
        while True:
            run = stub.GetTrainingRun(
                pb.GetTrainingRunRequest(training_run_id=run_id), metadata=admin, timeout=10
            ).training_run
            if run.state in (pb.TRAINING_RUN_STATE_SUCCEEDED, pb.TRAINING_RUN_STATE_FAILED):
                break
            assert time.monotonic() < deadline, f"training not done: {run}"
            time.sleep(0.5)
        assert run.state == pb.TRAINING_RUN_STATE_SUCCEEDED, run

        model = stub.GetModel(
            pb.GetModelRequest(model_version=started.model.model_version), metadata=admin, timeout=10
        ).model
        assert model.status == pb.MODEL_STATUS_ACTIVE, model.status_message
        evaluation = stub.GetModelEvaluation(
            pb.GetModelEvaluationRequest(model_version=model.model_version), metadata=admin, timeout=10
        ).evaluation

    assert evaluation.passed_gate and evaluation.refit_on_all_data
    warm, cold = evaluation.warm, evaluation.cold_start
    assert warm.customer_count > 100 and cold.customer_count >= 40
    assert warm.model_metrics.precision_at_k > warm.baseline_metrics.precision_at_k * 1.25, warm
    assert cold.model_metrics.precision_at_k > cold.baseline_metrics.precision_at_k, cold
    # Erased before training: in neither the model's data nor its customers.
    assert model.training_data.interaction_count == expected
    assert model.training_data.customer_count == SHAPE.customers - 1
    artefact = read_artefact(suite.data_dir / "models", model.model_version, model.artefact_sha256)
    assert ERASED not in artefact.customer_ids and "cust-00001" in artefact.customer_ids
