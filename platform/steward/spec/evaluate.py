"""The `evaluate` section: which metrics, on which split."""

from typing import Literal

from pydantic import Field

from steward.spec.base import Section
from steward.spec.fairness import FairnessSpec

Metric = Literal["accuracy", "precision", "recall", "f1_macro", "f1_weighted", "loss", "perplexity"]


class EvaluateSpec(Section):
    split: Literal["validation", "test"] = Field("test", description="Split evaluated after training.")
    metrics: list[Metric] = Field(
        default_factory=lambda: list[Metric](["accuracy", "f1_macro", "loss"]),
        description="Metrics written to metrics.json (perplexity for language models).",
    )
    per_group: bool = Field(True, description="Also compute every metric per value of each group column.")
    fairness: FairnessSpec = Field(
        default_factory=FairnessSpec,
        description="Per-group table with bootstrap intervals, fairness metrics and the fairness gate, with "
        "data.group_columns: per-group rates for classification, per-group perplexity for causal_lm.",
    )
