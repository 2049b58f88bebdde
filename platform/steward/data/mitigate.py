"""Pre-processing bias mitigation of the training split (Kamiran & Calders 2012): reweighing and resampling.

Both make the group attribute and the label statistically independent in what the model learns from. For every
(group g, label y) cell the expected size under independence is n_g * n_y / n:

- reweigh: each row of the cell gets weight expected / observed, used in the loss;
- resample: the cell is sampled (with replacement when it must grow) to its expected size ("uniform sampling").
"""

import dataclasses
from typing import Any

import numpy as np
import torch

from steward.data.errors import DataError
from steward.data.info import DataInfo
from steward.data.split import Split
from steward.spec.job import JobSpec


def fairness_column(spec: JobSpec) -> str | None:
    """The group column fairness is judged on: evaluate.fairness.group_column, else the first group column."""
    return spec.evaluate.fairness.group_column or (spec.data.group_columns[0] if spec.data.group_columns else None)


def positive_index(spec: JobSpec, info: DataInfo) -> int:
    """Class id of the favourable label (evaluate.fairness.positive_label, default the last label name)."""
    wanted = spec.evaluate.fairness.positive_label
    if wanted is None:
        return len(info.label_names) - 1
    if wanted not in info.label_names:
        raise DataError(
            "evaluate.fairness.positive_label",
            f"{wanted!r} is not a label of the train split; labels are {', '.join(info.label_names[:20])}",
        )
    return info.label_names.index(wanted)


def check_mitigation(spec: JobSpec, info: DataInfo) -> None:
    """Data-dependent checks made before training: a known positive label, and two classes for thresholds."""
    if spec.model.task != "classification" or not spec.data.group_columns:
        return
    positive_index(spec, info)
    mitigation = spec.train.mitigation
    if mitigation is not None and mitigation.method == "thresholds" and info.num_classes != 2:
        raise DataError(
            "train.mitigation.method",
            f"thresholds need a two-class label, the data has {info.num_classes} classes; use reweigh or resample",
        )


def _cells(labels: np.ndarray, groups: np.ndarray) -> dict[tuple[Any, Any], np.ndarray]:
    return {(g, y): np.flatnonzero((groups == g) & (labels == y)) for g in np.unique(groups) for y in np.unique(labels)}


def _expected(labels: np.ndarray, groups: np.ndarray, g: Any, y: Any) -> float:
    return float(np.sum(groups == g) * np.sum(labels == y) / len(labels))


def reweigh(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Kamiran & Calders weights: P(g) P(y) / P(g, y) per row (float32)."""
    weights = np.ones(len(labels), dtype=np.float32)
    for (g, y), rows in _cells(labels, groups).items():
        if len(rows):
            weights[rows] = _expected(labels, groups, g, y) / len(rows)
    return weights


def resample(labels: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Row indices with every (group, label) cell sampled to its size under independence (seeded)."""
    rng = np.random.default_rng([seed, 17])
    picked = []
    for (g, y), rows in _cells(labels, groups).items():
        size = round(_expected(labels, groups, g, y))
        if len(rows) and size:
            picked.append(rng.choice(rows, size, replace=size > len(rows)))
    return rng.permutation(np.concatenate(picked))


def positive_rates(labels: np.ndarray, groups: np.ndarray, positive: int, weights: np.ndarray | None = None) -> dict:
    """(Weighted) share of positive labels per group, and the largest gap between groups."""
    w = np.ones(len(labels)) if weights is None else weights
    rates = {
        str(g): float(np.sum(w * (labels == positive) * (groups == g)) / np.sum(w * (groups == g)))
        for g in np.unique(groups)
    }
    return {"positive_rate": rates, "gap": max(rates.values()) - min(rates.values())}


def mitigate_train(split: Split, spec: JobSpec, info: DataInfo) -> Split:
    """The training split with the spec's pre-processing mitigation applied (unchanged for thresholds / none).

    The split's `notes["mitigation"]` records the label balance per group before and after.
    """
    mitigation, column = spec.train.mitigation, fairness_column(spec)
    if mitigation is None or mitigation.method == "thresholds" or column is None:
        return split
    labels, groups = split.labels.numpy(), np.asarray(split.groups[column])
    positive = positive_index(spec, info)
    notes = {"method": mitigation.method, "group_column": column, "before": positive_rates(labels, groups, positive)}
    if mitigation.method == "reweigh":
        weights = reweigh(labels, groups)
        notes["after"] = positive_rates(labels, groups, positive, weights)
        return dataclasses.replace(split, sample_weight=torch.from_numpy(weights), notes={"mitigation": notes})
    rows = resample(labels, groups, spec.seed)
    out = split.take(torch.from_numpy(rows))
    notes["after"] = positive_rates(out.labels.numpy(), np.asarray(out.groups[column]), positive)
    notes["rows"] = {"before": len(split), "after": len(out)}
    return dataclasses.replace(out, notes={"mitigation": notes})
