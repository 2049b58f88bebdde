"""Metric maths over plain arrays: one implementation for training-time evaluation and `steward evaluate`."""

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score


def perplexity(loss: float) -> float:
    """exp of a mean token loss, capped so a diverged model reports a huge number rather than overflowing."""
    return math.exp(min(loss, 50.0))


def compute_metrics(
    names: Sequence[str], labels: np.ndarray, logits: np.ndarray, losses: np.ndarray
) -> dict[str, float]:
    """The requested metrics for one set of rows. `losses` holds each row's loss (token-mean for language models)."""
    out: dict[str, float] = {}
    loss = float(np.mean(losses)) if len(losses) else float("nan")
    predicted = logits.argmax(-1) if logits.ndim == 2 and logits.shape[-1] else None
    kwargs = {"zero_division": 0}
    for name in names:
        if name == "loss":
            out[name] = loss
        elif name == "perplexity":
            out[name] = perplexity(loss)
        elif name == "accuracy":
            out[name] = float(accuracy_score(labels, predicted))
        elif name == "precision":
            out[name] = float(precision_score(labels, predicted, average="macro", **kwargs))
        elif name == "recall":
            out[name] = float(recall_score(labels, predicted, average="macro", **kwargs))
        elif name in ("f1_macro", "f1_weighted"):
            out[name] = float(f1_score(labels, predicted, average=name.removeprefix("f1_"), **kwargs))
    return out
