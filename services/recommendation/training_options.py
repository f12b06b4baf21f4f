"""Range checks on TrainModel's options, as the contract states them (0 means the default).

Defaults are resolved by the pipeline (training/pipeline.py), which records them in the
run and the model; here only what a caller sent is judged, naming each bad field.
"""

from __future__ import annotations

from najimi.profile.v1 import profile_service_pb2 as profile_pb
from najimi.recommendation.v1 import recommendation_service_pb2 as pb

from shared.validation import Violations

ATTRIBUTES = {"age_range", "gender", "region"}
# The profile feed's interaction types by name; ratings are weighted by rating_threshold instead.
INTERACTION_TYPES = {
    name.removeprefix("INTERACTION_TYPE_")
    for name in profile_pb.InteractionType.keys()
    if name not in ("INTERACTION_TYPE_UNSPECIFIED", "INTERACTION_TYPE_RATING")
}


def _optional_range(
    violations: Violations, field: str, value: float, lo: float, hi: float, default: str
) -> None:
    """0 means the default; anything else must be in [lo, hi]."""
    if value != 0:
        violations.require_range(field, value, lo, hi, f"must be {lo} to {hi}, or 0 for {default}")


def _open_range(violations: Violations, field: str, value: float, hi: float, default: str) -> None:
    """0 means the default; anything else must be in (0, hi]."""
    if value != 0 and not 0 < value <= hi:
        violations.add(field, f"must be greater than 0 and at most {hi}, or 0 for {default}")


def check_training_options(
    options: pb.TrainingOptions, violations: Violations, prefix: str = "options"
) -> None:
    lightfm, features, evaluation = options.lightfm, options.features, options.evaluation
    at = f"{prefix}.lightfm"
    if lightfm.loss not in pb.Loss.values():
        violations.add(f"{at}.loss", "is not a known loss")
    if lightfm.learning_schedule not in pb.LearningSchedule.values():
        violations.add(f"{at}.learning_schedule", "is not a known schedule")
    _optional_range(violations, f"{at}.no_components", lightfm.no_components, 1, 512, "32")
    _open_range(violations, f"{at}.learning_rate", lightfm.learning_rate, 1, "0.05")
    if lightfm.rho != 0 and not 0 < lightfm.rho < 1:
        violations.add(f"{at}.rho", "must be greater than 0 and below 1, or 0 for 0.95")
    _open_range(violations, f"{at}.epsilon", lightfm.epsilon, 0.001, "1e-6")
    _optional_range(violations, f"{at}.item_alpha", lightfm.item_alpha, 0, 0.1, "none")
    _optional_range(violations, f"{at}.user_alpha", lightfm.user_alpha, 0, 0.1, "none")
    _optional_range(violations, f"{at}.epochs", lightfm.epochs, 1, 500, "30")
    _optional_range(violations, f"{at}.max_sampled", lightfm.max_sampled, 1, 1000, "10")
    _optional_range(violations, f"{at}.k", lightfm.k, 1, 100, "5")
    _optional_range(violations, f"{at}.n", lightfm.n, 1, 100, "10")
    if lightfm.n and lightfm.n < (lightfm.k or 5):
        violations.add(f"{at}.n", "must be at least k")

    at = f"{prefix}.features"
    _open_range(violations, f"{at}.identity_weight", features.identity_weight, 1, "0.6")
    for i, attribute in enumerate(features.customer_attributes):
        if attribute not in ATTRIBUTES and not (attribute.startswith("custom:") and len(attribute) > 7):
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
    _optional_range(violations, f"{at}.rating_threshold", features.rating_threshold, 1, 5, "3")

    at = f"{prefix}.evaluation"
    if evaluation.split_method not in pb.SplitMethod.values():
        violations.add(f"{at}.split_method", "is not a known split method")
    if evaluation.refit_policy not in pb.RefitPolicy.values():
        violations.add(f"{at}.refit_policy", "is not a known refit policy")
    _open_range(violations, f"{at}.test_fraction", evaluation.test_fraction, 0.5, "0.2")
    if evaluation.HasField("cold_start_fraction"):
        violations.require_range(f"{at}.cold_start_fraction", evaluation.cold_start_fraction, 0, 0.5)
    _optional_range(violations, f"{at}.k", evaluation.k, 1, 100, "10")
    _optional_range(violations, f"{at}.gate_margin", evaluation.gate_margin, 0, 10, "0.1")
    violations.require_count(f"{at}.random_seed", evaluation.random_seed)
