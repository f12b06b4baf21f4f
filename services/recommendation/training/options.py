"""TrainingOptions with every default resolved, as recommendation_service.proto documents them.

Range checks belong to TrainModel (INVALID_ARGUMENT naming the field); this only fills in
what a request left at 0, UNSPECIFIED or empty, so a run and its model record the values used.
"""

from __future__ import annotations

import secrets

from najimi.recommendation.v1 import recommendation_service_pb2 as pb

DEFAULT_CUSTOMER_ATTRIBUTES = ("age_range", "gender", "region")
DEFAULT_INTERACTION_TYPE_WEIGHTS = {
    "PURCHASE": 4.0,
    "ADD_TO_CART": 2.0,
    "ADD_TO_WISHLIST": 1.5,
    "VIEW": 1.0,
    "INQUIRY": 1.0,
}


def resolve_options(requested: pb.TrainingOptions) -> pb.TrainingOptions:
    """A copy of `requested` with every default filled in (a random seed drawn when 0)."""
    options = pb.TrainingOptions()
    options.CopyFrom(requested)
    lightfm = options.lightfm
    lightfm.loss = lightfm.loss or pb.LOSS_WARP
    lightfm.no_components = lightfm.no_components or 32
    lightfm.learning_schedule = lightfm.learning_schedule or pb.LEARNING_SCHEDULE_ADAGRAD
    lightfm.learning_rate = lightfm.learning_rate or 0.05
    lightfm.rho = lightfm.rho or 0.95
    lightfm.epsilon = lightfm.epsilon or 1e-6
    lightfm.epochs = lightfm.epochs or 30
    lightfm.max_sampled = lightfm.max_sampled or 10
    lightfm.k = lightfm.k or 5
    lightfm.n = lightfm.n or 10
    features = options.features
    features.identity_weight = features.identity_weight or 0.6
    if not features.customer_attributes:
        features.customer_attributes.extend(DEFAULT_CUSTOMER_ATTRIBUTES)
    if not features.interaction_type_weights:
        features.interaction_type_weights.extend(
            pb.InteractionTypeWeight(interaction_type=name, weight=weight)
            for name, weight in DEFAULT_INTERACTION_TYPE_WEIGHTS.items()
        )
    features.rating_threshold = features.rating_threshold or 3.0
    evaluation = options.evaluation
    evaluation.split_method = evaluation.split_method or pb.SPLIT_METHOD_RANDOM
    evaluation.test_fraction = evaluation.test_fraction or 0.2
    if not evaluation.HasField("cold_start_fraction"):
        evaluation.cold_start_fraction = 0.1
    evaluation.k = evaluation.k or 10
    evaluation.gate_margin = evaluation.gate_margin or 0.1
    evaluation.refit_policy = evaluation.refit_policy or pb.REFIT_POLICY_ALL_DATA
    # A seed that fits in int32 too: LightFM and numpy both take it.
    evaluation.random_seed = evaluation.random_seed or secrets.randbelow(2**31 - 1) + 1
    return options
