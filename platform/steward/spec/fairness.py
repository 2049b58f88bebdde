"""Fairness settings: `evaluate.fairness` (per-group table and gate) and `train.mitigation`."""

from typing import Any, Literal

from pydantic import Field

from steward.spec.base import Label, Section

# Gate metrics whose value must stay at or below the threshold (gaps, and the worst/best perplexity ratio) or at or
# above it (the classifier's ratios, which are at most 1).
UPPER_BOUNDED = (
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "perplexity_ratio",
    "perplexity_difference",
)
LOWER_BOUNDED = ("demographic_parity_ratio", "disparate_impact_ratio")
# A language model predicts no classes: its groups are compared by perplexity, worst over best.
LM_GATE = ("perplexity_ratio", "perplexity_difference")
GateMetric = Literal[
    "demographic_parity_difference",
    "equalized_odds_difference",
    "equal_opportunity_difference",
    "demographic_parity_ratio",
    "disparate_impact_ratio",
    "perplexity_ratio",
    "perplexity_difference",
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
        "this value, e.g. {demographic_parity_difference: 0.1}. A causal_lm is judged on its groups' perplexity: "
        "perplexity_ratio (worst group's over best group's) and perplexity_difference (worst minus best) at most "
        "this value, e.g. {perplexity_ratio: 1.25}. Empty: no gate.",
    )
    min_group_size: int = Field(
        10,
        ge=1,
        le=1_000_000,
        description="Fewest rows each group needs in every split of a causal_lm's per-group perplexity table; "
        "fewer is an error, since a perplexity from a handful of texts says little about the group.",
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
    problems |= _task_problems(spec)
    if "disparate_impact_ratio" in fairness.thresholds and fairness.privileged is None:
        problems["evaluate.fairness.privileged"] = "disparate_impact_ratio needs the privileged group value"
    if mitigation is not None and mitigation.method == "thresholds" and "validation" not in spec.data.splits:
        problems["train.mitigation.method"] = "thresholds are chosen on the validation split: add one to data.splits"
    if mitigation is not None and spec.train.include_validation:
        problems["train.include_validation"] = "mitigation is judged on the validation split; do not train on it"
    return problems


def _task_problems(spec: Any) -> dict[str, str]:
    """Settings that only one task can use: class-based gates and mitigation for classifiers, perplexity for LMs."""
    fairness, lm = spec.evaluate.fairness, spec.model.task == "causal_lm"
    problems: dict[str, str] = {}
    wrong = [m for m in fairness.thresholds if (m in LM_GATE) != lm]
    if wrong and lm:
        problems["evaluate.fairness.thresholds"] = (
            f"{wrong} judge predicted classes; a causal_lm's groups are judged by {' or '.join(LM_GATE)}"
        )
    elif wrong:
        problems["evaluate.fairness.thresholds"] = (
            f"{wrong} judge a language model's perplexity (task: causal_lm); a classifier is judged by "
            "demographic_parity_difference, equalized_odds_difference and the like"
        )
    if lm and spec.train.mitigation is not None:
        problems["train.mitigation"] = "rebalances class labels or decisions, which needs task: classification"
    for field in ("positive_label", "privileged"):
        if lm and getattr(fairness, field) is not None:
            problems[f"evaluate.fairness.{field}"] = "names a class or a reference group; a causal_lm has neither"
    return problems
