"""Group fairness metrics over predictions, matching Fairlearn and AIF360 to 1e-12.

Every metric is computed in two steps: `group_counts` reduces the arrays to per-group counts (records, selected,
and the binary confusion matrix for `positive`), then a `*_from_counts` function turns counts into the metric.
The streaming window state (`window_state.py`) keeps exactly these counts, so live metrics and offline metrics are
the same code.

Multiclass models are judged one-vs-rest: a record is "selected" when its prediction equals `positive`, and (for
the label-based metrics) "positive" when its label equals `positive`. For per-class monitoring call once per class.

Conventions for the edge cases (each one matches the oracle named):
- Empty input, arrays of different lengths, or NaN groups: `ValueError` naming the argument.
- Label-based metrics use only groups with labelled records (in a window, labels may arrive later or never).
- A single group: differences are 0.0 and ratios are 1.0 (or NaN if its rate is 0), as in Fairlearn.
- A group with no actual positives (or negatives) has an undefined TPR (or FPR). With `undefined="zero"` (the
  default) it counts as 0.0, which is what Fairlearn does (sklearn's `confusion_matrix(normalize="true")` fills 0/0
  with 0). With `undefined="skip"` the group is left out of that gap; a gap with fewer than two defined groups is
  0.0 if one group is defined and NaN if none is.
- `demographic_parity_ratio` when every group's selection rate is 0: NaN (Fairlearn's 0/0).
- `disparate_impact_ratio` when the privileged rate is 0: +inf if the unprivileged rate is positive, NaN if it is
  0 too (AIF360's float division).
- Signed metrics with no privileged or no unprivileged records: `ValueError` (AIF360 would return NaN).
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

Undefined = Literal["zero", "skip"]


@dataclass(frozen=True)
class GroupCounts:
    """One group's counts for one positive class: all records, and the labelled ones' confusion matrix."""

    n: int = 0  # records with a prediction
    selected: int = 0  # predictions equal to `positive`
    tp: int = 0
    fn: int = 0
    fp: int = 0
    tn: int = 0

    def __add__(self, other: GroupCounts) -> GroupCounts:
        return GroupCounts(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, int, int, int, int, int]:
        return (self.n, self.selected, self.tp, self.fn, self.fp, self.tn)

    @property
    def selection_rate(self) -> float:
        return self.selected / self.n if self.n else float("nan")

    @property
    def tpr(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else float("nan")

    @property
    def labelled(self) -> int:
        return self.tp + self.fn + self.fp + self.tn

    @property
    def error_rate(self) -> float:
        return (self.fn + self.fp) / self.labelled if self.labelled else float("nan")


def _as_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"`{name}` must be one-dimensional, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty: bias metrics need at least one record")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"`{name}` contains NaN; drop or impute those records first")
    return arr


def _check_inputs(named: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate every array first, then raise once with all problems (house style)."""
    problems, arrays = [], {}
    for name, values in named.items():
        try:
            arrays[name] = _as_1d(name, values)
        except ValueError as err:
            problems.append(str(err))
    if not problems and len({a.shape[0] for a in arrays.values()}) > 1:
        sizes = ", ".join(f"{k}={v.shape[0]}" for k, v in arrays.items())
        problems.append(f"arrays must have the same length, got {sizes}")
    if problems:
        raise ValueError("; ".join(problems))
    return arrays


def group_counts(y_pred: Any, groups: Any, positive: Any = 1, y_true: Any = None) -> dict[Hashable, GroupCounts]:
    """Per-group counts for `positive` (one-vs-rest). Without `y_true` the confusion cells are 0.

    Group values must be mutually sortable (one type); they come back as Python scalars.
    """
    named = (
        {"y_pred": y_pred, "groups": groups}
        if y_true is None
        else {"y_true": y_true, "y_pred": y_pred, "groups": groups}
    )
    arrays = _check_inputs(named)
    pred = arrays["y_pred"] == positive
    keys, inverse = np.unique(arrays["groups"], return_inverse=True)
    k = len(keys)
    n = np.bincount(inverse, minlength=k)
    selected = np.bincount(inverse, weights=pred, minlength=k)
    cells = np.zeros((k, 4), dtype=np.int64)  # tp, fn, fp, tn
    if y_true is not None:
        cell = 2 * (arrays["y_true"] != positive) + ~pred
        cells = np.bincount(inverse * 4 + cell, minlength=4 * k).reshape(k, 4)
    return {
        key.item() if hasattr(key, "item") else key: GroupCounts(int(n[i]), int(selected[i]), *map(int, cells[i]))
        for i, key in enumerate(keys)
    }


def _gap(rates: list[float], undefined: Undefined) -> float:
    """max - min over groups; an undefined (NaN) rate is 0 or is left out, per `undefined`."""
    if undefined == "zero":
        values = [0.0 if np.isnan(r) else r for r in rates]
    elif undefined == "skip":
        values = [r for r in rates if not np.isnan(r)]
    else:
        raise ValueError(f"`undefined` must be 'zero' or 'skip', got {undefined!r}")
    return float(max(values) - min(values)) if values else float("nan")


def _selection_rates(counts: Mapping[Hashable, GroupCounts]) -> list[float]:
    # a window can hold a group seen only through late labels (no predictions in it): it has no selection rate
    rates = [c.selection_rate for c in counts.values() if c.n > 0]
    if not rates:
        raise ValueError("`counts` has no group with predictions")
    return rates


def demographic_parity_difference_from_counts(counts: Mapping[Hashable, GroupCounts]) -> float:
    """`demographic_parity_difference` from per-group counts (e.g. a window's `group_counts`)."""
    rates = _selection_rates(counts)
    return float(max(rates) - min(rates))


def demographic_parity_ratio_from_counts(counts: Mapping[Hashable, GroupCounts]) -> float:
    """`demographic_parity_ratio` from per-group counts."""
    rates = _selection_rates(counts)
    return float(min(rates) / max(rates)) if max(rates) > 0 else float("nan")


def equal_opportunity_difference_from_counts(
    counts: Mapping[Hashable, GroupCounts], undefined: Undefined = "zero"
) -> float:
    """`equal_opportunity_difference` from per-group counts."""
    return _gap([c.tpr for c in counts.values() if c.labelled], undefined)


def equalized_odds_difference_from_counts(
    counts: Mapping[Hashable, GroupCounts], undefined: Undefined = "zero"
) -> float:
    """`equalized_odds_difference` from per-group counts."""
    # only groups with labelled records take part, as if Fairlearn were given the labelled subset
    labelled = [c for c in counts.values() if c.labelled]
    gaps = [_gap([c.tpr for c in labelled], undefined), _gap([c.fpr for c in labelled], undefined)]
    defined = [g for g in gaps if not np.isnan(g)]
    return max(defined) if defined else float("nan")


def _split_privileged(counts: Mapping[Hashable, GroupCounts], privileged: Any) -> tuple[GroupCounts, GroupCounts]:
    """Pool the privileged group(s) and, separately, every other group."""
    chosen = set(privileged) if isinstance(privileged, Collection) and not isinstance(privileged, str) else {privileged}
    missing = [p for p in chosen if p not in counts]
    if missing:
        raise ValueError(f"`privileged` {missing} not found among the groups {sorted(map(str, counts))}")
    priv, unpriv = GroupCounts(), GroupCounts()
    for key, c in counts.items():
        if key in chosen:
            priv = priv + c
        else:
            unpriv = unpriv + c
    problems = [
        f"`groups` has no {side} records" for side, c in (("privileged", priv), ("unprivileged", unpriv)) if not c.n
    ]
    if problems:
        raise ValueError("; ".join(problems) + ": the signed metrics need both sides")
    return priv, unpriv


def statistical_parity_difference_from_counts(counts: Mapping[Hashable, GroupCounts], privileged: Any) -> float:
    """`statistical_parity_difference` from per-group counts."""
    priv, unpriv = _split_privileged(counts, privileged)
    return unpriv.selection_rate - priv.selection_rate


def disparate_impact_ratio_from_counts(counts: Mapping[Hashable, GroupCounts], privileged: Any) -> float:
    """`disparate_impact_ratio` from per-group counts."""
    priv, unpriv = _split_privileged(counts, privileged)
    if priv.selection_rate == 0:
        return float("inf") if unpriv.selection_rate > 0 else float("nan")
    return unpriv.selection_rate / priv.selection_rate


def selection_rates(y_pred: Any, groups: Any, positive: Any = 1) -> dict[Hashable, float]:
    """Share of each group's predictions equal to `positive`: Fairlearn's `selection_rate` per group."""
    return {g: c.selection_rate for g, c in group_counts(y_pred, groups, positive).items()}


def demographic_parity_difference(y_pred: Any, groups: Any, positive: Any = 1) -> float:
    """Largest minus smallest group selection rate; Fairlearn's `demographic_parity_difference` (between_groups)."""
    return demographic_parity_difference_from_counts(group_counts(y_pred, groups, positive))


def demographic_parity_ratio(y_pred: Any, groups: Any, positive: Any = 1) -> float:
    """Smallest over largest group selection rate; Fairlearn's `demographic_parity_ratio`. NaN if all rates are 0."""
    return demographic_parity_ratio_from_counts(group_counts(y_pred, groups, positive))


def equalized_odds_difference(
    y_true: Any, y_pred: Any, groups: Any, positive: Any = 1, undefined: Undefined = "zero"
) -> float:
    """The larger of the between-group TPR gap and FPR gap; Fairlearn's `equalized_odds_difference` (worst_case).

    A group with no actual positives (negatives) has no TPR (FPR); see the module docstring for `undefined`.
    """
    return equalized_odds_difference_from_counts(group_counts(y_pred, groups, positive, y_true), undefined)


def equal_opportunity_difference(
    y_true: Any, y_pred: Any, groups: Any, positive: Any = 1, undefined: Undefined = "zero"
) -> float:
    """Largest minus smallest group TPR; Fairlearn's `equal_opportunity_difference`."""
    return equal_opportunity_difference_from_counts(group_counts(y_pred, groups, positive, y_true), undefined)


def statistical_parity_difference(y_pred: Any, groups: Any, privileged: Any, positive: Any = 1) -> float:
    """P(pred = positive | unprivileged) - P(pred = positive | privileged); AIF360's `statistical_parity_difference`.

    Signed: negative means the unprivileged side is selected less. `privileged` is one group value or a collection
    of them; privileged groups are pooled, and so are all the other (unprivileged) groups, as AIF360 does.
    """
    return statistical_parity_difference_from_counts(group_counts(y_pred, groups, positive), privileged)


def disparate_impact_ratio(y_pred: Any, groups: Any, privileged: Any, positive: Any = 1) -> float:
    """P(pred = positive | unprivileged) / P(pred = positive | privileged); AIF360's `disparate_impact`.

    +inf when only the privileged rate is 0, NaN when both are (AIF360's float division).
    """
    return disparate_impact_ratio_from_counts(group_counts(y_pred, groups, positive), privileged)
