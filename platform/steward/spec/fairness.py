"""Fairness settings: `evaluate.fairness` (per-group table and gate) and `train.mitigation`."""

from typing import Any, Literal

from pydantic import Field

from steward.spec.base import Label, Section

# Gate metrics whose value must stay at or below the threshold (gaps) or at or above it (ratios).
UPPER_BOUNDED = ("demographic_parity_difference", "equalized_odds_difference", "equal_opportunity_difference")
LOWER_BOUNDED = ("demographic_parity_ratio", "disparate_impact_ratio")
GateMetric = Literal[
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "demographic_parity_ratio",
    "disparate_impact_ratio",
]


class FairnessSpec(Section):
    group_column: str | None = Field(
        None, description="Group column judged (default: the first of data.group_columns)."
    )
    positive_label: Label | None = Field(
        None, description="Label counted as the favourable outcome, one-vs-rest (default: the last label name)."
    )
    privileged: Label | None = Field(
        None, description="Privileged group value, for the signed metrics (disparate_impact_ratio needs it)."
    )
    splits: list[Literal["validation", "test"]] = Field(
        default_factory=lambda: list[Literal["validation", "test"]](["validation", "test"]),
        description="Splits given a per-group table.",
    )
    bootstrap: int = Field(200, ge=0, le=100_000, description="Bootstrap resamples for confidence intervals (0: off).")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap intervals.")
    thresholds: dict[GateMetric, float] = Field(
        default_factory=dict,
        description="The fairness gate, judged on evaluate.split: gaps (..._difference) at most, ratios at least "
        "this value, e.g. {demographic_parity_difference: 0.1}. Empty: no gate.",
    )


class MitigationSpec(Section):
    method: Literal["resample", "reweigh", "thresholds"] = Field(
        description="resample: group-balanced resampling of the training split (Kamiran & Calders' uniform "
        "sampling); reweigh: sample weights in the loss so group and label are independent; thresholds: "
        "per-group decision thresholds chosen on the validation split, saved with the model, applied by serving."
    )
    target: Literal["demographic_parity", "equal_opportunity"] = Field(
        "demographic_parity",
        description="thresholds: equalise selection rates (demographic_parity) or true positive rates.",
    )


def fairness_problems(spec: Any) -> dict[str, str]:
    """Cross-section checks of evaluate.fairness and train.mitigation against data and model (a JobSpec)."""
    problems: dict[str, str] = {}
    fairness, mitigation, groups = spec.evaluate.fairness, spec.train.mitigation, spec.data.group_columns
    if mitigation is not None and not groups:
        problems["train.mitigation"] = (
            "mitigation needs a group attribute: set data.group_columns (e.g. [group]) or remove train.mitigation"
        )
    if fairness.thresholds and not groups:
        problems["evaluate.fairness.thresholds"] = (
            "a fairness gate needs a group attribute: set data.group_columns or remove the thresholds"
        )
    if fairness.group_column is not None and fairness.group_column not in groups:
        problems["evaluate.fairness.group_column"] = (
            f"{fairness.group_column!r} is not one of data.group_columns {groups}; add it there"
        )
    if "disparate_impact_ratio" in fairness.thresholds and fairness.privileged is None:
        problems["evaluate.fairness.privileged"] = "disparate_impact_ratio needs the privileged group value"
    if mitigation is not None and mitigation.method == "thresholds" and "validation" not in spec.data.splits:
        problems["train.mitigation.method"] = "thresholds are chosen on the validation split: add one to data.splits"
    if mitigation is not None and spec.train.include_validation:
        problems["train.include_validation"] = "mitigation is judged on the validation split; do not train on it"
    return problems
