"""Hand-made models for serving tests and benches: an artefact whose scores a test can
predict, registered in the service's registry (as the training worker would) and then
activated through ActivateModel like any other version."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.artefacts import ModelArtefact, write_artefact
from services.recommendation.registry import Finished, ModelRegistry

PURCHASES = "user.behavior.purchase_history"
BROWSING = "user.behavior.browsing_history"


def artefact_of(
    item_ids: Sequence[str],
    customer_ids: Sequence[str],
    item_vectors: np.ndarray,
    customer_vectors: np.ndarray,
    item_biases: np.ndarray | None = None,
    attributes: Sequence[str] = (),
    categories: Sequence[str] = (PURCHASES, BROWSING),
) -> ModelArtefact:
    """Items and customers with identity features only (their vectors as given), plus the
    customer attribute features `attributes` (e.g. "age_range:25-34") with random
    embeddings that no customer row holds: a cold start with such an attribute gets them."""
    items, dims = item_vectors.shape
    customers = len(customer_ids)
    rng = np.random.default_rng(len(attributes))
    attribute_vectors = rng.standard_normal((len(attributes), dims)).astype(np.float32)
    biases = np.zeros(items, dtype=np.float32) if item_biases is None else item_biases.astype(np.float32)
    customer_features = scipy.sparse.hstack(
        [scipy.sparse.identity(customers), scipy.sparse.csr_matrix((customers, len(attributes)))],
        format="csr",
        dtype=np.float32,
    )
    return ModelArtefact(
        version="",
        item_ids=list(item_ids),
        customer_ids=list(customer_ids),
        item_embeddings=item_vectors.astype(np.float32),
        item_biases=biases,
        customer_embeddings=customer_vectors.astype(np.float32),
        customer_biases=np.zeros(customers, dtype=np.float32),
        item_feature_embeddings=item_vectors.astype(np.float32),
        item_feature_biases=biases,
        customer_feature_embeddings=np.vstack([customer_vectors, attribute_vectors]).astype(np.float32),
        customer_feature_biases=np.zeros(customers + len(attributes), dtype=np.float32),
        item_feature_names=[f"item:{item_id}" for item_id in item_ids],
        customer_feature_names=[f"customer:{c}" for c in customer_ids] + list(attributes),
        item_features=scipy.sparse.identity(items, format="csr", dtype=np.float32),
        customer_features=customer_features,
        metadata={"training_data": {"data_categories": list(categories)}},
    )


async def register(registry: ModelRegistry, model_dir: Path, artefact: ModelArtefact, request_id: str) -> str:
    """Registers `artefact` as a READY model that passed the gate; returns its version."""
    queued, model = await registry.queue_training(
        "admin", pb.TrainModelRequest(request_id=request_id), pb.TrainingOptions(), False
    )
    run = await registry.claim_next()
    assert run is not None and run.training_run_id == queued.training_run_id
    checksum = write_artefact(
        model_dir,
        ModelArtefact(**{**artefact.__dict__, "version": model.model_version}),
    )
    await registry.succeed(
        run,
        Finished(
            evaluation=pb.ModelEvaluation(passed_gate=True),
            passed_gate=True,
            gate_message="hand-made",
            options=pb.TrainingOptions(),
            training_data=pb.TrainingData(),
            artefact_sha256=checksum,
        ),
    )
    return model.model_version
