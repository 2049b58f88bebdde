"""The `monitor` section: bias and drift watched on every endpoint deployed from the spec."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from steward.spec.base import Label, Section, raise_problems

BiasMetric = Literal[
    "statistical_parity_difference",
    "disparate_impact_ratio",
    "demographic_parity_difference",
    "demographic_parity_ratio",
    "equalized_odds_difference",
    "equal_opportunity_difference",
]
Signal = Literal["features", "embeddings", "predictions", "confidence", "text"]
DEFAULT_BIAS_THRESHOLDS: dict[str, tuple[float, float]] = {
    "statistical_parity_difference": (-0.1, 0.1),
    "disparate_impact_ratio": (0.8, 1.25),
    "demographic_parity_difference": (0.0, 0.1),
    "demographic_parity_ratio": (0.8, 1.0),
    "equalized_odds_difference": (0.0, 0.1),
    "equal_opportunity_difference": (0.0, 0.1),
}
SIGNED = ("statistical_parity_difference", "disparate_impact_ratio")
Share = Annotated[float, Field(ge=0, le=1)]
MAX_RECORDS = 10_000_000  # records (or seconds) in one window: more than a monitor holds in memory


class BiasSpec(Section):
    group: str = Field(description="Request attribute (from `attributes` in /predict) that holds each record's group.")
    favourable: Label = Field(description="Class label counted as the favourable outcome (one-vs-rest).")
    privileged: Label | None = Field(
        None, description="Privileged group for the signed metrics (statistical parity difference, disparate impact)."
    )
    metrics: list[BiasMetric] = Field(
        default_factory=lambda: ["statistical_parity_difference", "disparate_impact_ratio"],  # type: ignore[arg-type]
        min_length=1,
        description="Group-fairness metrics judged on every window; odds/opportunity need labels via /feedback.",
    )
    thresholds: dict[BiasMetric, tuple[float, float]] = Field(
        default_factory=dict,
        description="Allowed [low, high] per metric (defaults: |SPD| <= 0.1, DIR in [0.8, 1.25], gaps <= 0.1).",
    )
    min_records_per_group: int = Field(
        30,
        ge=1,
        le=MAX_RECORDS,
        description="Records a group needs in a window before it is judged (labelled records, for the label-based "
        "metrics: equalized odds and equal opportunity).",
    )
    max_groups: int = Field(
        50,
        ge=2,
        le=1000,
        description="Distinct group values a replica keeps apart; values first seen after that many are counted "
        "together as `(other)`, so clients cannot grow the monitor's state (or its metric labels) without bound.",
    )

    @model_validator(mode="after")
    def _privileged_for_signed(self) -> "BiasSpec":
        signed = [m for m in self.metrics if m in SIGNED]
        problems: dict[str | tuple, str] = {}
        if signed and self.privileged is None:
            problems["privileged"] = f"{signed} compare against a privileged group: set privileged"
        for metric, (low, high) in self.thresholds.items():
            if low > high:
                problems[("thresholds", metric)] = f"low ({low}) is above high ({high}); give [low, high]"
        raise_problems(self, problems)
        return self

    def bounds(self, metric: str) -> tuple[float, float]:
        """The allowed range of a metric: the spec's, else the default."""
        return self.thresholds.get(metric, DEFAULT_BIAS_THRESHOLDS[metric])  # type: ignore[call-overload]


class WindowSpec(Section):
    by: Literal["count", "time"] = Field("count", description="Windows of a number of records, or of seconds.")
    size: float = Field(500, gt=0, le=MAX_RECORDS, description="Records (or seconds) per window.")
    step: float | None = Field(None, gt=0, le=MAX_RECORDS, description="Slide (default: size, tumbling windows).")

    @model_validator(mode="after")
    def _whole_steps(self) -> "WindowSpec":
        step = self.step or self.size
        if step > self.size or abs(self.size / step - round(self.size / step)) > 1e-9:
            raise_problems(self, {"step": f"must divide size ({self.size}) into whole steps; e.g. {self.size / 2}"})
        return self


class DriftSpec(Section):
    signals: list[Signal] = Field(
        default_factory=lambda: ["features", "embeddings", "predictions", "confidence", "text"],  # type: ignore[arg-type]
        description="What to compare with the reference (each used where the model's inputs have it).",
    )
    psi_threshold: float = Field(0.2, gt=0, le=1000, description="Alert when a histogram's PSI is above this.")
    ks_pvalue: float = Field(0.01, gt=0, lt=1, description="Alert when a feature's KS p-value (corrected) is below.")
    mmd_pvalue: float = Field(0.01, gt=0, lt=1, description="Alert when the embeddings' MMD p-value is below this.")
    chi2_pvalue: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Alert when a categorical signal's chi-square p-value (predicted classes, categorical inputs; "
        "corrected over those signals) is below this.",
    )
    mmd_permutations: int = Field(100, ge=10, le=10_000, description="Permutations of the MMD test.")
    correction: Literal["bonferroni", "fdr"] = Field(
        "bonferroni", description="Correction over the per-feature KS tests, and over the chi-square tests."
    )
    min_records: int = Field(50, ge=2, le=MAX_RECORDS, description="Records a window needs before drift is judged.")


class PerformanceSpec(Section):
    min_accuracy: Share | None = Field(None, description="Lowest accuracy allowed on a window's late labels.")
    min_recall: Share | None = Field(
        None, description="Lowest recall (macro over classes, as evaluate's `recall`) allowed on a window's labels."
    )
    min_f1_macro: Share | None = Field(None, description="Lowest macro F1 allowed on a window's late labels.")
    min_labels: int = Field(
        30,
        ge=1,
        le=MAX_RECORDS,
        description="Labels (POST /feedback) a window, or a group in it, needs before its performance is judged.",
    )

    @model_validator(mode="after")
    def _some_minimum(self) -> "PerformanceSpec":
        if not self.minimums():
            raise_problems(self, {"min_accuracy": "set at least one of min_accuracy, min_recall, min_f1_macro"})
        return self

    def minimums(self) -> dict[str, float]:
        """The lowest allowed value of each judged metric, by its name in window reports."""
        floors = {"accuracy": self.min_accuracy, "recall": self.min_recall, "f1_macro": self.min_f1_macro}
        return {name: floor for name, floor in floors.items() if floor is not None}


class LeakSpec(Section):
    max_pii: int = Field(
        0, ge=0, le=MAX_RECORDS, description="Personal-data values of one type a window's generated text may hold."
    )
    max_regurgitation: Share = Field(
        0.5, description="Largest share of a window's generated n-grams (of `ngram` tokens) found in the training text."
    )
    ngram: int = Field(8, ge=4, le=64, description="Tokens in the n-grams regurgitation is judged on.")


class AlertSpec(Section):
    consecutive_windows: int = Field(
        2, ge=1, le=100_000, description="Windows a metric must fail in a row before it alerts."
    )
    webhook: str | None = Field(
        None, pattern=r"^https?://", description="URL that alert and recovery events are POSTed to (JSON)."
    )


class MonitorSpec(Section):
    bias: BiasSpec | None = Field(None, description="Group fairness of the live predictions.")
    drift: DriftSpec | None = Field(None, description="Drift of live inputs and outputs from the training reference.")
    performance: PerformanceSpec | None = Field(
        None,
        description="Accuracy, recall and F1 from late labels (POST /feedback), over each window and per group: the "
        "window report always has them; this section judges them and alerts.",
    )
    leaks: LeakSpec | None = Field(
        None, description="causal_lm only: personal data and training text in what the model generates."
    )
    window: WindowSpec = Field(default_factory=WindowSpec, description="How live records are grouped into windows.")
    alerts: AlertSpec = Field(default_factory=AlertSpec, description="When a failing metric becomes an alert.")
    push_interval_s: float = Field(
        2.0,
        gt=0,
        le=60,
        description="The longest a replica holds its counts before sending them (what a killed replica can lose). "
        "A busy replica sends sooner, once it holds a few shares of the count window (each cut where the window "
        "closes); each push is a Ray call that costs CPU time, so a shorter interval costs more.",
    )
    persist_interval_s: float = Field(5.0, gt=0, le=3600, description="How often the monitor saves its state.")
    pending_persist_interval_s: float = Field(
        60.0,
        gt=0,
        le=86_400,
        description="How often the monitor saves the predictions waiting for a late label (up to 100,000, so "
        "apart from the statistics and less often: saving that many is costly): after a restart, a label for a "
        "prediction made since the last such save is not matched.",
    )
    feedback_rate: float = Field(
        50.0,
        gt=0,
        le=100_000,
        description="Late labels (POST /feedback) each replica accepts a second, in bursts of up to a second's "
        "worth; more are refused with 429 and Retry-After.",
    )
    history: int = Field(200, ge=1, le=100_000, description="Closed windows kept (and persisted).")
    max_invalid_rate: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of a window's records refused as invalid (their model output is not finite) above which "
        "the window fails the `invalid_rate` check.",
    )
