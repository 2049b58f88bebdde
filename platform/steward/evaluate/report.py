"""The fairness part of metrics.json: per-split tables and metrics, the gate, and each mitigation's before/after.

A classifier and a language model write the same keys (`fairness` with `group_column` and per-split `groups` and
`metrics`, `fairness_gate`, `fairness_gate_problems`), so the card, `steward runs`, the deploy gate and the
registry read both alike; only the table's columns and the metrics differ.
"""

from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from steward.data import DataInfo, Split, load_splits
from steward.data.mitigate import fairness_column, positive_index
from steward.evaluate.fairness import fairness_metrics, gate, split_report
from steward.evaluate.lm_fairness import check_group_sizes, perplexity_gate, perplexity_report
from steward.evaluate.predict import predict
from steward.evaluate.thresholds import Thresholds, adjust_logits, choose_thresholds, save_thresholds
from steward.spec import JobSpec


def fairness_result(
    spec: JobSpec,
    info: DataInfo,
    splits: dict[str, Split],
    predicted: dict[str, tuple[np.ndarray, ...]],
    gate_split: str,
    thresholds: Thresholds | None,
) -> dict[str, Any]:
    """`fairness` (per split: group table and metrics), the gate on `gate_split`, and `mitigation`.

    `predicted` maps split -> (labels, raw logits, losses); thresholds, when given, decide the predictions.
    """
    fair, column, positive = spec.evaluate.fairness, fairness_column(spec), positive_index(spec, info)
    assert column is not None  # callers only report fairness with group columns
    report: dict[str, Any] = {"group_column": column, "positive_label": info.label_names[positive], "splits": {}}
    before_after: dict[str, Any] = {}
    for name, (y, z, _) in predicted.items():
        groups = splits[name].groups[column]
        raw = z.argmax(-1)
        decided = adjust_logits(z, groups, thresholds).argmax(-1) if thresholds else raw
        report["splits"][name] = split_report(y, decided, groups, positive, fair, spec.seed)
        if thresholds:
            before_after[name] = {
                "before": _summary(y, raw, groups, positive, fair.privileged),
                "after": _summary(y, decided, groups, positive, fair.privileged),
            }
    out: dict[str, Any] = {"fairness": report}
    if fair.thresholds:
        problems = gate(report["splits"][gate_split]["metrics"], {str(k): v for k, v in fair.thresholds.items()})
        out["fairness_gate"] = "failed" if problems else "passed"
        out["fairness_gate_problems"] = problems
    if spec.train.mitigation is not None:
        out["mitigation"] = _mitigation(spec, splits, report, before_after, thresholds)
    return out


def perplexity_fairness_result(
    spec: JobSpec, splits: dict[str, Split], predicted: dict[str, tuple[np.ndarray, ...]], gate_split: str
) -> dict[str, Any]:
    """A language model's `fairness` (per split: per-group perplexity table and disparity) and its gate on
    `gate_split`. `predicted` maps split -> (labels, logits, per-row losses); only the losses are used."""
    fair, column = spec.evaluate.fairness, fairness_column(spec)
    if column is None:
        raise ValueError("a fairness report needs a group column; callers check data.group_columns")
    check_group_sizes(column, {name: splits[name].groups[column] for name in predicted}, fair)
    report: dict[str, Any] = {"group_column": column, "measure": "perplexity", "splits": {}}
    for name, (_, _, losses) in predicted.items():
        report["splits"][name] = perplexity_report(losses, splits[name].groups[column], fair, spec.seed)
    out: dict[str, Any] = {"fairness": report}
    if fair.thresholds:
        thresholds = {str(k): v for k, v in fair.thresholds.items()}
        problems = perplexity_gate(report["splits"][gate_split], column, thresholds)
        out["fairness_gate"] = "failed" if problems else "passed"
        out["fairness_gate_problems"] = problems
    return out


def _summary(y: np.ndarray, pred: np.ndarray, groups: list, positive: int, privileged: str | None) -> dict:
    return {"accuracy": float(np.mean(y == pred)), **fairness_metrics(y, pred, groups, positive, privileged)}


def _mitigation(
    spec: JobSpec, splits: dict[str, Split], report: dict, before_after: dict, thresholds: Thresholds | None
) -> dict[str, Any]:
    """What the mitigation did: for thresholds, the model's accuracy and fairness before and after on each split;
    for reweigh / resample, the training labels' balance per group before and after, and the model's result
    (its "before" is a run of the same spec without train.mitigation)."""
    assert spec.train.mitigation is not None
    out: dict[str, Any] = {"method": spec.train.mitigation.method}
    if thresholds is not None:
        out |= {"target": thresholds.target, "thresholds": thresholds.thresholds, "model": before_after}
        return out
    out["data"] = splits["train"].notes.get("mitigation", {})
    out["model"] = {name: {"after": {"accuracy": _accuracy(r), **r["metrics"]}} for name, r in report["splits"].items()}
    return out


def _accuracy(split_report: dict) -> float:
    groups = split_report["groups"].values()
    return sum(g["accuracy"] * g["count"] for g in groups) / max(1, sum(g["count"] for g in groups))


def fit_thresholds(model: nn.Module, info: DataInfo, spec: JobSpec, model_dir: Path) -> Thresholds:
    """Choose per-group thresholds on the validation split for train.mitigation.target; save them beside the model."""
    assert spec.train.mitigation is not None
    column, positive = fairness_column(spec), positive_index(spec, info)
    assert column is not None
    validation = load_splits(spec, info)["validation"]
    y, z, _ = predict(model, validation, spec.model.task)
    p = np.exp(z - z.max(-1, keepdims=True))
    p_positive = (p / p.sum(-1, keepdims=True))[:, positive]
    target = spec.train.mitigation.target
    chosen = choose_thresholds(p_positive, y == positive, validation.groups[column], target)
    thresholds = Thresholds(column, positive, target, chosen)
    save_thresholds(model_dir, thresholds)
    return thresholds
