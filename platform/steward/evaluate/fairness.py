"""Per-group table with bootstrap intervals, group fairness metrics and the fairness gate, at training time.

Every number comes from `steward.monitor.bias`: `group_counts` reduces predictions to per-group confusion counts
and the fairness metrics are its functions, so the evaluation of a run and the live monitor of its deployment
compute the same statistic the same way. Multiclass models are judged one-vs-rest for the positive label.
"""

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from steward.monitor import bias
from steward.monitor.bias import GroupCounts
from steward.spec.fairness import LOWER_BOUNDED, FairnessSpec

TABLE_METRICS = ("accuracy", "precision", "recall", "f1", "selection_rate", "tpr", "fpr")


def count_metrics(c: GroupCounts) -> dict[str, float]:
    """The table's metrics from one group's counts (0/0 is NaN, except precision and F1: 0, as scikit-learn)."""
    nan = float("nan")
    return {
        "accuracy": (c.tp + c.tn) / c.labelled if c.labelled else nan,
        "precision": c.tp / (c.tp + c.fp) if c.tp + c.fp else 0.0,
        "recall": c.tpr,
        "f1": 2 * c.tp / (2 * c.tp + c.fp + c.fn) if c.tp + c.fp + c.fn else 0.0,
        "selection_rate": c.selection_rate,
        "tpr": c.tpr,
        "fpr": c.fpr,
    }


def group_table(
    y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence[Any], positive: int, spec: FairnessSpec, seed: int = 0
) -> dict[str, dict]:
    """Per group: count, each TABLE_METRICS value and its bootstrap interval (`<metric>_ci`: [low, high]).

    Rows are resampled within each group (its size fixed), `spec.bootstrap` times, percentile intervals.
    """
    names = np.asarray([str(g) for g in groups])
    counts = bias.group_counts(y_pred, names, positive, y_true)
    rng = np.random.default_rng([seed, 11])
    table: dict[str, dict] = {}
    for group, c in counts.items():
        row: dict[str, Any] = {"count": c.n, **count_metrics(c)}
        rows = np.flatnonzero(names == group)
        for name, (low, high) in _intervals(y_true[rows] == positive, y_pred[rows] == positive, spec, rng).items():
            row[f"{name}_ci"] = [low, high]
        table[str(group)] = row
    return table


def _intervals(truth: np.ndarray, picked: np.ndarray, spec: FairnessSpec, rng: np.random.Generator) -> dict:
    """Percentile bootstrap intervals of every table metric for one group's rows."""
    if spec.bootstrap == 0 or len(truth) == 0:
        return {}
    draws = rng.integers(0, len(truth), (spec.bootstrap, len(truth)))
    t, p = truth[draws], picked[draws]
    cells = [(t & p).sum(1), (t & ~p).sum(1), (~t & p).sum(1), (~t & ~p).sum(1)]  # tp, fn, fp, tn
    samples = [
        count_metrics(GroupCounts(len(truth), int(tp + fp), int(tp), int(fn), int(fp), int(tn)))
        for tp, fn, fp, tn in zip(*cells, strict=True)
    ]
    tail = (1 - spec.confidence) / 2 * 100
    out = {}
    for name in TABLE_METRICS:
        values = np.array([s[name] for s in samples], dtype=float)
        values = values[~np.isnan(values)]
        out[name] = (
            [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            if len(values)
            else [None] * 2
        )
    return out


def fairness_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence[Any], positive: int, privileged: str | None
) -> dict[str, float]:
    """Group fairness metrics (Fairlearn's, and AIF360's signed ones when a privileged group is named)."""
    counts: dict[Hashable, GroupCounts] = bias.group_counts(
        y_pred, np.asarray([str(g) for g in groups]), positive, y_true
    )
    out = {
        "demographic_parity_difference": bias.demographic_parity_difference_from_counts(counts),
        "demographic_parity_ratio": bias.demographic_parity_ratio_from_counts(counts),
        "equalized_odds_difference": bias.equalized_odds_difference_from_counts(counts),
        "equal_opportunity_difference": bias.equal_opportunity_difference_from_counts(counts),
    }
    if privileged is not None:
        out["statistical_parity_difference"] = bias.statistical_parity_difference_from_counts(counts, privileged)
        out["disparate_impact_ratio"] = bias.disparate_impact_ratio_from_counts(counts, privileged)
    return out


def gate(metrics: dict[str, float], thresholds: Mapping[str, float]) -> list[str]:
    """Problems of a fairness gate: each threshold broken (an undefined metric breaks it too)."""
    problems = []
    for name, limit in thresholds.items():
        value = metrics.get(name, float("nan"))
        lower = name in LOWER_BOUNDED
        if math.isnan(value) or (value < limit if lower else value > limit):
            relation = "at least" if lower else "at most"
            problems.append(f"{name} = {value:.4f}, must be {relation} {limit:g}")
    return problems


def split_report(
    y_true: np.ndarray, y_pred: np.ndarray, groups: Sequence[Any], positive: int, spec: FairnessSpec, seed: int
) -> dict[str, Any]:
    """One split's per-group table and fairness metrics."""
    return {
        "groups": group_table(y_true, y_pred, groups, positive, spec, seed),
        "metrics": fairness_metrics(y_true, y_pred, groups, positive, spec.privileged),
    }
