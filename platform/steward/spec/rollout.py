"""The `serve.rollout` section: how a challenger model reaches users beside the live champion (shadow or canary), and
the gates that decide on the same traffic whether it goes on, holds, is promoted or is rolled back."""

from typing import Annotated, Literal

from pydantic import Field, model_validator

from steward.spec.base import Section, raise_problems
from steward.spec.monitor import MonitorSpec

Share = Annotated[float, Field(ge=0, le=1)]


class GatesSpec(Section):
    """What the challenger must show at every step, judged on windows of the same live traffic as the champion's."""

    bias: bool = Field(
        True, description="Each challenger window passes monitor.bias's thresholds (judged when monitor.bias is set)."
    )
    drift: bool = Field(
        True,
        description="No drift check fails for the challenger (against its own reference) that passes for the "
        "champion in its latest window: traffic that moved for both is no reason to roll back.",
    )
    max_selection_rate_gap: Share | None = Field(
        0.1,
        description="Largest difference between the arms' favourable rates in any group of a window "
        "(monitor.bias's group and favourable class); null: not gated.",
    )
    min_agreement: Share | None = Field(
        None, description="shadow: least share of mirrored records both arms classify alike; null: reported only."
    )
    max_error_rate_increase: Share = Field(
        0.01, description="Largest share of the challenger's requests failing beyond the champion's share."
    )
    max_latency_ratio: float | None = Field(
        None,
        ge=1.0,
        le=1000.0,
        description="Largest challenger p50 model time per request (its share of the forward pass that answered "
        "it; the route is the same for both arms) over the champion's; null: reported only.",
    )
    max_accuracy_drop: Share | None = Field(
        0.05,
        description="Late labels (/feedback): largest drop of the challenger's accuracy below the champion's, overall "
        "and in each group; judged once both arms have min_labels labels in the step.",
    )
    max_recall_drop: Share | None = Field(
        None, description="As max_accuracy_drop, for macro recall (each window weighted by its labels); null: off."
    )
    max_f1_drop: Share | None = Field(
        None, description="As max_accuracy_drop, for macro F1 (each window weighted by its labels); null: off."
    )
    min_labels: int = Field(30, ge=1, le=10_000_000, description="Labels an arm needs before accuracy is compared.")


class RolloutSpec(Section):
    mode: Literal["shadow", "canary"] = Field(
        "canary",
        description="canary: the challenger answers a share of requests; shadow: the champion answers every request "
        "and a share is mirrored to the challenger off the request path.",
    )
    steps: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [0.1, 0.25, 0.5],
        min_length=1,
        max_length=20,
        description="The challenger's share of requests at each step (shadow: the share mirrored), increasing.",
    )
    min_records: int = Field(
        200, ge=1, le=10_000_000, description="Challenger records a step needs before its gates let it go on."
    )
    auto_promote: bool = Field(
        True, description="Promote once the last step's gates pass; false: hold for `steward rollout promote`."
    )
    sticky_header: str | None = Field(
        "x-client-id",
        pattern=r"^[A-Za-z0-9-]{1,64}$",
        description="canary: requests with the same value of this header stay on one arm while the share holds; "
        "null or absent: each request is routed at random.",
    )
    interval_s: float = Field(
        1.0, gt=0.0, le=60.0, description="How often the gates are judged and replicas learn the share."
    )
    gates: GatesSpec = Field(default_factory=GatesSpec, description="What the challenger must show at every step.")

    @model_validator(mode="after")
    def _increasing(self) -> "RolloutSpec":
        if any(b <= a for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise_problems(self, {"steps": f"{self.steps} must increase step by step, e.g. [0.1, 0.25, 0.5]"})
        return self


def rollout_problems(rollout: RolloutSpec | None, monitor: MonitorSpec | None, lm: bool) -> dict[str, str]:
    """What serve.rollout needs from the rest of the spec: the arms' monitors (its gates judge their windows) and
    predicted classes."""
    if rollout is None:
        return {}
    if lm:
        return {"serve.rollout": "compares predicted classes, which needs task: classification; remove serve.rollout"}
    if monitor is None:
        return {"serve.rollout": "its gates judge each arm's monitor windows: add a monitor section"}
    if rollout.gates.max_selection_rate_gap is not None and monitor.bias is None:
        return {
            "serve.rollout.gates.max_selection_rate_gap": "needs monitor.bias (group and favourable class); "
            "add it, or set the gate to null"
        }
    return {}
