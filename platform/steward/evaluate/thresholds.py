"""Per-group decision thresholds (post-processing mitigation): chosen on validation, saved with the model, served.

A two-class model predicts the positive class when P(positive) >= 0.5. Here each group gets its own threshold t_g,
chosen on the validation split so that every group's selection rate (demographic parity) or true positive rate
(equal opportunity) is as close as it can get to the whole split's at 0.5, as Hardt et al. (2016) and Fairlearn's
ThresholdOptimizer do without randomisation. Applying t_g is the same as shifting the positive logit by -logit(t_g):
`adjust_logits` does that, so every later argmax (metrics, serving) sees the thresholded decision.
"""

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

FILE = "thresholds.json"


@dataclass(frozen=True)
class Thresholds:
    """Per-group thresholds on P(positive) for one group column; groups not listed use `default`."""

    group_column: str
    positive_index: int
    target: str
    thresholds: dict[str, float]
    default: float = 0.5

    def of(self, groups: Sequence[Any]) -> np.ndarray:
        """The threshold of each row's group."""
        return np.array([self.thresholds.get(str(g), self.default) for g in groups], dtype=np.float64)


def _rate(p: np.ndarray, y: np.ndarray | None, t: float) -> float:
    chosen = p >= t if y is None else p[y] >= t
    return float(chosen.mean()) if chosen.size else float("nan")


def choose_thresholds(
    p_positive: np.ndarray, is_positive: np.ndarray, groups: Sequence[Any], target: str
) -> dict[str, float]:
    """Each group's threshold whose rate (selection rate, or TPR for equal_opportunity) is nearest the target.

    The target is the whole split's rate at 0.5; ties go to the threshold nearest 0.5 (the smallest change).
    """
    names = np.asarray([str(g) for g in groups])
    labelled = is_positive if target == "equal_opportunity" else None
    goal = _rate(p_positive, labelled, 0.5)
    chosen = {}
    for group in np.unique(names):
        rows = names == group
        p, y = p_positive[rows], (labelled[rows] if labelled is not None else None)
        candidates = np.unique(np.concatenate([p, [0.5]]))
        gaps = [abs(_rate(p, y, t) - goal) if not math.isnan(_rate(p, y, t)) else math.inf for t in candidates]
        best = min(range(len(candidates)), key=lambda i: (round(gaps[i], 9), abs(candidates[i] - 0.5)))
        chosen[str(group)] = float(candidates[best])
    return chosen


def adjust_logits(logits: np.ndarray, groups: Sequence[Any], thresholds: Thresholds) -> np.ndarray:
    """Two-class logits with the positive logit shifted so that argmax picks it exactly when P(positive) >= t_g."""
    t = np.clip(thresholds.of(groups), 1e-6, 1 - 1e-6)
    out = np.array(logits, dtype=np.float64, copy=True)
    out[:, thresholds.positive_index] -= np.log(t / (1 - t))
    # An exact tie (P = t) must choose the positive class, and argmax takes the first maximum.
    tie = out[:, thresholds.positive_index] == out[:, 1 - thresholds.positive_index]
    out[tie, thresholds.positive_index] += 1e-9
    return out.astype(logits.dtype)


def adjust_probabilities(probabilities: np.ndarray, groups: Sequence[Any], thresholds: Thresholds) -> np.ndarray:
    """Probabilities re-normalised after `adjust_logits` (what a served model with thresholds returns)."""
    logits = adjust_logits(np.log(np.clip(probabilities, 1e-12, 1.0)).astype(np.float64), groups, thresholds)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(probabilities.dtype)


def save_thresholds(model_dir: Path, thresholds: Thresholds) -> Path:
    """Write thresholds.json beside the model (serving reads it from there)."""
    path = Path(model_dir) / FILE
    path.write_text(json.dumps(asdict(thresholds), indent=2))
    return path


def load_thresholds(model_dir: Path) -> Thresholds | None:
    """The model's thresholds, or None when it has none."""
    path = Path(model_dir) / FILE
    return Thresholds(**json.loads(path.read_text())) if path.exists() else None
