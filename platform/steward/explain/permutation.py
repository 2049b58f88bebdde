"""Permutation feature importance: how much a score drops when one feature's values are shuffled across rows.

For numeric inputs [N, T, F]: sequences (T time steps of F features), images read as rows x columns, and
tabular rows, which enter steward as (1, F) arrays. A feature is shuffled at every time step at once (the
same row permutation), a time step across every feature, so each answers "does the model use this?".
"""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from steward.errors import StewardError

Scorer = Callable[[Tensor], float]


def model_scorer(model: nn.Module, labels: Tensor, metric: str, batch_size: int = 512) -> Scorer:
    """score(inputs) of `model` on `labels`, higher is better: accuracy, or minus the mean cross entropy."""

    @torch.no_grad()
    def score(inputs: Tensor) -> float:
        logits = torch.cat([model(inputs[i : i + batch_size]).float() for i in range(0, len(inputs), batch_size)])
        if metric == "accuracy":
            return float((logits.argmax(-1) == labels).float().mean())
        return -float(F.cross_entropy(logits, labels))

    return score


def permutation_importance(score: Scorer, inputs: Tensor, axis: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Importance of every index along `axis` (1: time steps, 2: features) of float `inputs` [N, T, F].

    importance = score(inputs) - score(inputs with that index's values permuted across rows), once per repeat,
    each repeat with its own seeded permutation. Returns the baseline score and, per index, mean, std and the
    repeats themselves, plus the indices ranked by mean importance (most important first).
    """
    if inputs.dim() != 3 or axis not in (1, 2):
        raise ValueError(f"permutation importance needs [N, T, F] inputs and axis 1 or 2, got {tuple(inputs.shape)}")
    rng = np.random.default_rng([seed, axis])
    base = score(inputs)
    rows: list[dict[str, Any]] = []
    for index in range(inputs.shape[axis]):
        drops = []
        for _ in range(repeats):
            order = torch.from_numpy(rng.permutation(len(inputs)))
            shuffled = inputs.clone()
            where = (slice(None), index) if axis == 1 else (slice(None), slice(None), index)
            shuffled[where] = inputs[order][where]
            drops.append(base - score(shuffled))
        rows.append({"index": index, "mean": float(np.mean(drops)), "std": float(np.std(drops)), "repeats": drops})
    ranking = [row["index"] for row in sorted(rows, key=lambda r: -r["mean"])]
    return {"baseline_score": base, "importances": rows, "ranking": ranking}


def as_steps_by_features(inputs: Tensor, modality: str) -> Tensor:
    """Numeric inputs as [N, T, F]: sequences as they are, images [N, H, W] as rows x columns.

    Raises StewardError for text (token positions hold different words in different rows, so shuffling a
    position is not shuffling a feature) and for multi-channel images.
    """
    if modality == "text":
        raise StewardError(
            "permutation importance covers tabular, sequence and image inputs, not text; "
            "use Integrated Gradients (steward explain RUN --input ...) for per-token attributions"
        )
    if inputs.dim() != 3:
        raise StewardError(
            f"permutation importance needs [N, T, F] or [N, H, W] inputs, got {tuple(inputs.shape)}; "
            "leave out --permutation for this model"
        )
    return inputs
