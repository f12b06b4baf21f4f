"""TrainModel's options as recommendation_service.proto states them: what a caller may send
(`check_training_options`: INVALID_ARGUMENT naming each bad field) and what a field left at
0, UNSPECIFIED or empty means (`resolve_options`, which the pipeline records in the run and
the model). The defaults below serve both, so a message never names a default the run
would not use.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection

from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from shared.validation import Violations

# The defaults of the numeric fields, 0 meaning the default (item_alpha and user_alpha:
# 0 is none; evaluation.cold_start_fraction: unset is the default, 0 is none).
LIGHTFM_DEFAULTS = {
    "no_components": 32,
    "learning_rate": 0.05,
    "rho": 0.95,
    "epsilon": 1e-6,
    "epochs": 30,
    "max_sampled": 10,
    "k": 5,
    "n": 10,
}
FEATURE_DEFAULTS = {"identity_weight": 0.6, "rating_threshold": 3.0}
EVALUATION_DEFAULTS = {"test_fraction": 0.2, "k": 10, "gate_margin": 0.1}
DEFAULT_COLD_START_FRACTION = 0.1
DEFAULT_CUSTOMER_ATTRIBUTES = ("age_range", "gender", "region")
DEFAULT_INTERACTION_TYPE_WEIGHTS = {
    "PURCHASE": 4.0,
    "ADD_TO_CART": 2.0,
    "ADD_TO_WISHLIST": 1.5,
    "VIEW": 1.0,
    "INQUIRY": 1.0,
}
# The profile feed's interaction types by name; ratings are weighted by rating_threshold instead.
INTERACTION_TYPES = {
    name.removeprefix("INTERACTION_TYPE_")
    for name in profile_pb.InteractionType.keys()
    if name not in ("INTERACTION_TYPE_UNSPECIFIED", "INTERACTION_TYPE_RATING")
}


# -- what a caller may send -------------------------------------------------------------------


def _shown(default: object) -> str:
    """A default as a message names it: 32, 0.05, 1e-6, 3 (not 3.0), none."""
    return f"{default:g}".replace("e-0", "e-") if isinstance(default, float | int) else str(default)


def _optional_range(
    violations: Violations, field: str, value: float, lo: float, hi: float, default: object
) -> None:
    """0 means the default; anything else must be in [lo, hi]."""
    if value != 0:
        violations.require_range(field, value, lo, hi, f"must be {lo} to {hi}, or 0 for {_shown(default)}")


def _open_range(violations: Violations, field: str, value: float, hi: float, default: object) -> None:
    """0 means the default; anything else must be in (0, hi]."""
    if value != 0 and not 0 < value <= hi:
        violations.add(field, f"must be greater than 0 and at most {hi}, or 0 for {_shown(default)}")


def _known(violations: Violations, field: str, value: int, known: Collection[int], what: str) -> None:
    if value not in known:
        violations.add(field, f"is not a known {what}")


def check_training_options(
    options: pb.TrainingOptions, violations: Violations, prefix: str = "options"
) -> None:
    lightfm, features, evaluation = options.lightfm, options.features, options.evaluation
    at = f"{prefix}.lightfm"
    given = LIGHTFM_DEFAULTS
    _known(violations, f"{at}.loss", lightfm.loss, pb.Loss.values(), "loss")
    _known(
        violations,
        f"{at}.learning_schedule",
        lightfm.learning_schedule,
        pb.LearningSchedule.values(),
        "schedule",
    )
    _optional_range(violations, f"{at}.no_components", lightfm.no_components, 1, 512, given["no_components"])
    _open_range(violations, f"{at}.learning_rate", lightfm.learning_rate, 1, given["learning_rate"])
    if lightfm.rho != 0 and not 0 < lightfm.rho < 1:
        violations.add(f"{at}.rho", f"must be greater than 0 and below 1, or 0 for {_shown(given['rho'])}")
    _open_range(violations, f"{at}.epsilon", lightfm.epsilon, 0.001, given["epsilon"])
    _optional_range(violations, f"{at}.item_alpha", lightfm.item_alpha, 0, 0.1, "none")
    _optional_range(violations, f"{at}.user_alpha", lightfm.user_alpha, 0, 0.1, "none")
    _optional_range(violations, f"{at}.epochs", lightfm.epochs, 1, 500, given["epochs"])
    _optional_range(violations, f"{at}.max_sampled", lightfm.max_sampled, 1, 1000, given["max_sampled"])
    _optional_range(violations, f"{at}.k", lightfm.k, 1, 100, given["k"])
    _optional_range(violations, f"{at}.n", lightfm.n, 1, 100, given["n"])
    if lightfm.n and lightfm.n < (lightfm.k or given["k"]):
        violations.add(f"{at}.n", "must be at least k")

    at = f"{prefix}.features"
    _open_range(
        violations, f"{at}.identity_weight", features.identity_weight, 1, FEATURE_DEFAULTS["identity_weight"]
    )
    for i, attribute in enumerate(features.customer_attributes):
        if attribute not in DEFAULT_CUSTOMER_ATTRIBUTES and not (
            attribute.startswith("custom:") and len(attribute) > 7
        ):
            violations.add(
                f"{at}.customer_attributes[{i}]", "must be age_range, gender, region or custom:<key>"
            )
    seen: set[str] = set()
    for i, entry in enumerate(features.interaction_type_weights):
        if entry.interaction_type not in INTERACTION_TYPES or entry.interaction_type in seen:
            violations.add(
                f"{at}.interaction_type_weights[{i}].interaction_type",
                f"must be one of {', '.join(sorted(INTERACTION_TYPES))}, each once",
            )
        seen.add(entry.interaction_type)
        if not 0 < entry.weight <= 10:
            violations.add(
                f"{at}.interaction_type_weights[{i}].weight", "must be greater than 0 and at most 10"
            )
    _optional_range(
        violations,
        f"{at}.rating_threshold",
        features.rating_threshold,
        1,
        5,
        FEATURE_DEFAULTS["rating_threshold"],
    )

    at = f"{prefix}.evaluation"
    given = EVALUATION_DEFAULTS
    _known(violations, f"{at}.split_method", evaluation.split_method, pb.SplitMethod.values(), "split method")
    _known(violations, f"{at}.refit_policy", evaluation.refit_policy, pb.RefitPolicy.values(), "refit policy")
    _open_range(violations, f"{at}.test_fraction", evaluation.test_fraction, 0.5, given["test_fraction"])
    if evaluation.HasField("cold_start_fraction"):
        violations.require_range(f"{at}.cold_start_fraction", evaluation.cold_start_fraction, 0, 0.5)
    _optional_range(violations, f"{at}.k", evaluation.k, 1, 100, given["k"])
    _optional_range(violations, f"{at}.gate_margin", evaluation.gate_margin, 0, 10, given["gate_margin"])
    violations.require_count(f"{at}.random_seed", evaluation.random_seed)


# -- what the run uses --------------------------------------------------------------------------


def resolve_options(requested: pb.TrainingOptions) -> pb.TrainingOptions:
    """A copy of `requested` with every default filled in (a random seed drawn when 0)."""
    options = pb.TrainingOptions()
    options.CopyFrom(requested)
    lightfm = options.lightfm
    lightfm.loss = lightfm.loss or pb.LOSS_WARP
    lightfm.learning_schedule = lightfm.learning_schedule or pb.LEARNING_SCHEDULE_ADAGRAD
    for name, default in LIGHTFM_DEFAULTS.items():
        setattr(lightfm, name, getattr(lightfm, name) or default)
    features = options.features
    for name, default in FEATURE_DEFAULTS.items():
        setattr(features, name, getattr(features, name) or default)
    if not features.customer_attributes:
        features.customer_attributes.extend(DEFAULT_CUSTOMER_ATTRIBUTES)
    if not features.interaction_type_weights:
        features.interaction_type_weights.extend(
            pb.InteractionTypeWeight(interaction_type=name, weight=weight)
            for name, weight in DEFAULT_INTERACTION_TYPE_WEIGHTS.items()
        )
    evaluation = options.evaluation
    evaluation.split_method = evaluation.split_method or pb.SPLIT_METHOD_RANDOM
    evaluation.refit_policy = evaluation.refit_policy or pb.REFIT_POLICY_ALL_DATA
    for name, default in EVALUATION_DEFAULTS.items():
        setattr(evaluation, name, getattr(evaluation, name) or default)
    if not evaluation.HasField("cold_start_fraction"):
        evaluation.cold_start_fraction = DEFAULT_COLD_START_FRACTION
    # A seed that fits in int32 too: LightFM and numpy both take it.
    evaluation.random_seed = evaluation.random_seed or secrets.randbelow(2**31 - 1) + 1
    return options
