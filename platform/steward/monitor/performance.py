"""Accuracy, recall and F1 of a window from its late labels, over all its labelled records and per group.

A label counts in the window where it arrives (`WindowState.confusion`: records per (group, label, predicted)), so a
deployment's window history gives its performance over time. The metrics are `evaluate/metrics.py`'s, by the same
names and conventions, computed from counts: `accuracy`; `recall`, macro over classes; `f1_macro`. The classes of a
macro average are those seen among that set's labels or predictions, and a ratio with nothing to divide by is 0
(scikit-learn's `zero_division=0`), so each value equals scikit-learn's on the labelled records of that set.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from steward.monitor.window_state import WindowState

METRICS = ("accuracy", "recall", "f1_macro")
Confusion = Mapping[tuple[Hashable, Hashable], int]  # (label, predicted) -> records


def scores(confusion: Confusion) -> dict[str, Any]:
    """`labelled` records and each of `METRICS` (None without labels) from one set's confusion counts."""
    labelled = sum(confusion.values())
    if not labelled:
        return {"labelled": 0, **dict.fromkeys(METRICS)}
    classes = {label for label, _ in confusion} | {predicted for _, predicted in confusion}
    support = dict.fromkeys(classes, 0)  # records of each true class
    chosen = dict.fromkeys(classes, 0)  # records predicted as each class
    hits = dict.fromkeys(classes, 0)
    for (label, predicted), count in confusion.items():
        support[label] += count
        chosen[predicted] += count
        if label == predicted:
            hits[label] += count
    recall = [hits[c] / support[c] if support[c] else 0.0 for c in classes]
    # F1 = 2 TP / (2 TP + FP + FN) = 2 TP / (support + predicted): never 0/0 for a class that was seen
    f1 = [2 * hits[c] / (support[c] + chosen[c]) for c in classes]
    return {
        "labelled": labelled,
        "accuracy": sum(hits.values()) / labelled,
        "recall": sum(recall) / len(classes),
        "f1_macro": sum(f1) / len(classes),
    }


def window_performance(window: WindowState) -> dict[str, Any]:
    """`scores` over every label that arrived in the window ("overall") and per group ("groups", keyed by str(group)
    as selection rates are); a group with predictions but no label in the window has `labelled` 0 and None metrics.
    Records without a group (no bias section) count in "overall" only."""
    overall: dict[tuple[Hashable, Hashable], int] = {}
    groups: dict[Hashable, dict[tuple[Hashable, Hashable], int]] = {g: {} for g, _ in window.predicted}
    for (group, label, predicted), count in window.confusion.items():
        cells = groups.setdefault(group, {})
        for target in (cells, overall):
            target[label, predicted] = target.get((label, predicted), 0) + count
    return {
        "overall": scores(overall),
        "groups": {str(g): scores(cells) for g, cells in groups.items() if g is not None},
    }
