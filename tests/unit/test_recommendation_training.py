"""A training run on a generated dataset with planted structure (customers' tastes follow
their segment, which shows in their attributes): the model beats popularity for warm
customers and for cold-start ones scored from attributes alone, is refit on all data after
the gate, and hands back float32 representations that are its feature rows summed."""

from __future__ import annotations

import dataclasses

import grpc
import numpy as np
import pytest
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from services.recommendation.training.pipeline import PHASE_SPANS, Progress, TrainingFailed, run_training
from services.recommendation.training.synthetic import Shape, StaticSource, generate

SHAPE = Shape(customers=300, items=400, interactions=9000, seed=5)


def options(**evaluation) -> pb.TrainingOptions:
    return pb.TrainingOptions(
        lightfm=pb.LightFMParameters(epochs=10),
        evaluation=pb.EvaluationProtocol(random_seed=11, **evaluation),
    )


async def test_the_model_beats_popularity_warm_and_cold_and_is_refit_on_all_data():
    data = generate(SHAPE)
    seen: list[Progress] = []
    outcome = await run_training(StaticSource(data), options(), seen.append)

    warm, cold = outcome.evaluation["warm"], outcome.evaluation["cold_start"]
    assert warm["model_metrics"]["precision_at_k"] > 1.3 * warm["baseline_metrics"]["precision_at_k"]
    assert cold["model_metrics"]["precision_at_k"] > cold["baseline_metrics"]["precision_at_k"]
    assert warm["model_metrics"]["auc"] > warm["baseline_metrics"]["auc"]
    assert cold["customer_count"] == "30"  # 10 % of 300, held out whole (int64 as JSON text)
    assert outcome.passed_gate and outcome.evaluation["refit_on_all_data"]
    assert outcome.gate_message.endswith(": passed")

    # Every phase but WRITING (the registry's), in order, with epochs counted twice.
    phases = list(dict.fromkeys(p.phase for p in seen))
    assert phases == [name for name in PHASE_SPANS if name != "WRITING"]
    assert [p.epochs_completed for p in seen if p.phase == "REFITTING"] == list(range(11))
    fractions = [p.fraction for p in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(PHASE_SPANS["REFITTING"][1])
    assert set(outcome.phase_seconds) == set(phases)

    artefact = outcome.artefact
    assert artefact is not None and artefact.version == ""
    assert len(artefact.customer_ids) == 300 and len(artefact.item_ids) == 400
    for array in (artefact.item_embeddings, artefact.customer_embeddings, artefact.item_biases):
        assert array.dtype == np.float32 and array.flags.c_contiguous
    assert artefact.item_embeddings.shape == (400, 32)
    np.testing.assert_allclose(
        artefact.item_embeddings,
        artefact.item_features @ artefact.item_feature_embeddings,
        rtol=1e-5,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        artefact.customer_biases,
        artefact.customer_features @ artefact.customer_feature_biases,
        rtol=1e-5,
        atol=1e-6,
    )
    # Refit on all data: every customer, cold-start ones included, has their identity feature.
    identity = artefact.customer_features[:, : len(artefact.customer_ids)].diagonal()
    assert (identity > 0).all()
    assert artefact.item_feature_names[0] == artefact.item_ids[0].join(("item:", ""))
    assert "category:top0/sub0" in artefact.item_feature_names
    assert outcome.resolved_options["features"]["identity_weight"] == 0.6
    assert outcome.resolved_options["evaluation"]["random_seed"] == "11"  # int64 as JSON text
    assert artefact.metadata["training_data"]["interaction_count"] == str(len(data.interactions))
    assert artefact.metadata["evaluation"] == outcome.evaluation


async def test_a_model_below_the_gate_is_rejected_and_not_refit():
    outcome = await run_training(
        StaticSource(generate(SHAPE)), options(gate_margin=10), lambda progress: None
    )
    assert not outcome.passed_gate and not outcome.evaluation.get("refit_on_all_data", False)
    assert outcome.gate_message.endswith(": rejected") and "margin 1000%" in outcome.gate_message
    assert "REFITTING" not in outcome.phase_seconds
    # The split model is handed back (a forced activation needs it): cold-start rows lack identity.
    artefact = outcome.artefact
    assert artefact is not None
    identity = artefact.customer_features[:, : len(artefact.customer_ids)].diagonal()
    assert (identity == 0).sum() == 30


async def test_too_few_interactions_fail_with_a_reason():
    data = generate(Shape(customers=5, items=10, interactions=10, seed=2))
    lone = dataclasses.replace(data, interactions=data.interactions[:1])
    with pytest.raises(TrainingFailed) as failed:
        await run_training(StaticSource(lone), options(), lambda progress: None)
    assert failed.value.reason == "NOT_ENOUGH_INTERACTIONS"


async def test_customers_profile_no_longer_lists_are_left_out_of_training():
    data = generate(SHAPE)
    erased = "cust-00007"
    customers = {cid: c for cid, c in data.customers.items() if cid != erased}
    assert any(i.customer_id == erased for i in data.interactions)  # still in this copy of the data
    outcome = await run_training(
        StaticSource(dataclasses.replace(data, customers=customers)), options(), lambda progress: None
    )
    assert outcome.artefact is not None
    assert erased not in outcome.artefact.customer_ids and len(outcome.artefact.customer_ids) == 299
    assert f"customer:{erased}" not in outcome.artefact.customer_feature_names


class UnreachableProfile:
    async def load(self):
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "connection refused"
        )


async def test_an_unreachable_profile_fails_the_run_with_a_reason():
    with pytest.raises(TrainingFailed) as failed:
        await run_training(UnreachableProfile(), options(), lambda progress: None)
    assert failed.value.reason == "PROFILE_UNAVAILABLE"
    assert "UNAVAILABLE connection refused" in failed.value.message
