"""Per-group perplexity of a language model: the table with bootstrap intervals, the disparity and its gate.

A language model predicts no classes, so its groups are compared by how well it models their text: each group's
loss is the mean of its rows' token-mean losses and its perplexity the exp of that, exactly as metrics.json's
`groups`, so the fairness table and the per-group metrics never disagree. The disparity is the worst group's
perplexity over the best group's (`perplexity_ratio`, 1 when every group is modelled alike) and their gap
(`perplexity_difference`).
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from steward.data import DataError
from steward.evaluate.fairness import gate
from steward.evaluate.metrics import perplexity
from steward.spec.fairness import FairnessSpec


def perplexity_table(losses: np.ndarray, groups: Sequence[Any], spec: FairnessSpec, seed: int = 0) -> dict[str, dict]:
    """Per group: count, loss and perplexity, and their bootstrap intervals (`loss_ci`, `perplexity_ci`).

    Rows are resampled within each group (its size fixed), `spec.bootstrap` times, percentile intervals; the
    perplexity interval is the exp of the loss interval (exp is monotone).
    """
    names = np.asarray([str(g) for g in groups])
    rng = np.random.default_rng([seed, 13])
    tail = (1 - spec.confidence) / 2 * 100
    table: dict[str, dict] = {}
    for group in sorted(set(names.tolist())):
        rows = np.asarray(losses)[names == group]
        loss = float(np.mean(rows))  # the same float32 mean as compute_metrics, so the numbers match `groups`
        row: dict[str, Any] = {"count": len(rows), "loss": loss, "perplexity": perplexity(loss)}
        if spec.bootstrap:
            means = rows[rng.integers(0, len(rows), (spec.bootstrap, len(rows)))].mean(1)
            low, high = float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))
            row |= {"loss_ci": [low, high], "perplexity_ci": [perplexity(low), perplexity(high)]}
        table[group] = row
    return table


def perplexity_report(losses: np.ndarray, groups: Sequence[Any], spec: FairnessSpec, seed: int) -> dict[str, Any]:
    """One split's per-group perplexity table, its disparity metrics, and which groups are worst and best."""
    table = perplexity_table(losses, groups, spec, seed)
    worst = max(table, key=lambda g: table[g]["perplexity"])
    best = min(table, key=lambda g: table[g]["perplexity"])
    high, low = table[worst]["perplexity"], table[best]["perplexity"]
    return {
        "groups": table,
        "metrics": {"perplexity_ratio": high / low, "perplexity_difference": high - low},
        "worst_group": worst,
        "best_group": best,
    }


def check_group_sizes(column: str, groups_by_split: Mapping[str, Sequence[Any]], spec: FairnessSpec) -> None:
    """Raise one DataError naming every group with fewer rows than evaluate.fairness.min_group_size, per split."""
    problems = []
    for split, groups in groups_by_split.items():
        values, counts = np.unique(np.asarray([str(g) for g in groups]), return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            if count < spec.min_group_size:
                problems.append(
                    (
                        "evaluate.fairness.min_group_size",
                        f"group {column}={value!r} has {count} row(s) in the {split} split, fewer than "
                        f"{spec.min_group_size}: give that split a larger share in data.splits, add rows of the "
                        "group, or lower evaluate.fairness.min_group_size",
                    )
                )
    DataError.raise_all(problems)


def perplexity_gate(report: dict[str, Any], column: str, thresholds: Mapping[str, float]) -> list[str]:
    """The gate's problems on one split's report, each naming the worst and the best group's perplexity."""
    worst, best = report["worst_group"], report["best_group"]
    groups = report["groups"]
    named = (
        f" ({column}={worst!r}: perplexity {groups[worst]['perplexity']:.4f}, "
        f"{column}={best!r}: {groups[best]['perplexity']:.4f})"
    )
    return [problem + named for problem in gate(report["metrics"], thresholds)]
