"""The `explain` section: Integrated Gradients settings, permutation importance, and the caps of POST /explain.

One section rather than `evaluate.explain` + `serve.explain`: the CLI and the server share the IG settings, and
the serving caps sit beside the step count they bound, so "n_steps above max_steps" is checked in one place.
"""

from typing import Literal

from pydantic import Field, model_validator

from steward.spec.base import Section, raise_problems

Baseline = Literal["auto", "zeros", "blur", "pad"]
# Which baselines make sense for which input: pad is a token, blur needs a spatial or time axis to smooth.
NUMERIC_BASELINES = ("zeros", "blur")
TEXT_BASELINES = ("pad",)


class PermutationSpec(Section):
    repeats: int = Field(5, ge=1, le=100, description="Shuffles per feature; the report gives their mean and std.")
    max_rows: int = Field(
        2000, ge=10, le=1_000_000, description="Validation rows used at most (the first ones), to bound the cost."
    )
    metric: Literal["accuracy", "loss"] = Field(
        "accuracy", description="Score whose change is the importance: accuracy drop, or loss increase."
    )


class ExplainSpec(Section):
    baseline: Baseline = Field(
        "auto",
        description="IG reference input: zeros, blur (Gaussian-smoothed input: images over pixels, sequences over "
        "time), pad (text: every non-special token replaced by the pad token). auto: pad for text, zeros otherwise.",
    )
    blur_sigma: float = Field(2.0, gt=0.0, le=100.0, description="Standard deviation of the blur baseline.")
    n_steps: int = Field(
        64, ge=2, le=4096, description="Integration steps of Integrated Gradients (Gauss-Legendre points)."
    )
    internal_batch_size: int = Field(
        64, ge=1, le=65_536, description="Interpolated inputs per forward/backward pass (bounds memory, not results)."
    )
    output: Literal["probability", "logit"] = Field(
        "probability", description="What is attributed: the target class's softmax probability or its logit."
    )
    permutation: PermutationSpec = Field(
        default_factory=PermutationSpec, description="Permutation importance on the validation split."
    )
    max_steps: int = Field(
        128, ge=2, le=4096, description="POST /explain: most integration steps a request may ask for."
    )
    max_instances: int = Field(8, ge=1, le=1024, description="POST /explain: most instances one request may carry.")

    @model_validator(mode="after")
    def _steps_within_cap(self) -> "ExplainSpec":
        if self.n_steps > self.max_steps:
            raise_problems(
                self, {"n_steps": f"{self.n_steps} is above max_steps ({self.max_steps}); lower it or raise max_steps"}
            )
        return self


def baseline_problem(baseline: str, family: str, modality: str | None = None) -> str | None:
    """Why `baseline` cannot be used for this model family (and data modality, once known), or None."""
    text = modality == "text" if modality else family == "transformer"
    if baseline == "auto" or (modality is None and family == "lstm"):  # an LSTM reads text or numbers
        return None
    if text and baseline not in TEXT_BASELINES:
        return f"{baseline} is not a baseline for text (token ids); use pad or auto"
    if not text and baseline not in NUMERIC_BASELINES:
        return f"{baseline} is a text baseline; use zeros, blur or auto for numeric inputs"
    return None


def resolve_baseline(baseline: str, modality: str) -> str:
    """The concrete baseline for `modality` (auto -> pad for text, zeros otherwise)."""
    if baseline == "auto":
        return "pad" if modality == "text" else "zeros"
    return baseline
