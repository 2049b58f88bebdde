"""k-anonymity of tabular quasi-identifiers: generalise (bucket numbers, truncate codes), then suppress the rest.

The search is Datafly's greedy one (Sweeney 2002): while more rows than `max_suppression` allows sit in
equivalence classes smaller than k, generalise the quasi-identifier with the most distinct values one level
further. What is left below k is suppressed (removed), and the achieved k is measured on the output.
"""

import math
from collections import Counter
from typing import Any

import numpy as np

from steward.data.errors import DataError
from steward.spec.privacy import KAnonymitySpec, QuasiIdentifier

FIELD = "privacy.k_anonymity"


def generalise(values: list[Any], qi: QuasiIdentifier, level: int) -> list[str]:
    """Values of one column at a generalisation level (0: as they are, as text); missing values become "*"."""
    out = []
    for value in values:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out.append("*")
        elif level == 0:
            out.append(str(value))
        elif qi.kind == "numeric":
            width = qi.bucket * 2 ** (level - 1)
            low = math.floor(float(value) / width) * width
            out.append(f"{low:g}-{low + width:g}")
        else:
            text = str(value)
            kept = max(0, len(text) - level)
            out.append(text[:kept] + "*" * (len(text) - kept))
    return out


def _classes(table: dict[str, list], spec: KAnonymitySpec, levels: dict[str, int]) -> list[tuple[str, ...]]:
    columns = [generalise(list(table[q.column]), q, levels[q.column]) for q in spec.quasi_identifiers]
    return list(zip(*columns, strict=True))


def choose_levels(table: dict[str, list], spec: KAnonymitySpec) -> dict[str, int]:
    """The generalisation level of every quasi-identifier; DataError naming the fix when k cannot be reached."""
    n = len(table[spec.quasi_identifiers[0].column])
    if spec.k > n:
        raise DataError(f"{FIELD}.k", f"k={spec.k} cannot be reached with {n} rows; lower k below the row count")
    levels = {q.column: 0 for q in spec.quasi_identifiers}
    while True:
        counts = Counter(_classes(table, spec, levels))
        small = sum(c for c in counts.values() if c < spec.k)
        if small <= spec.max_suppression * n:
            return levels
        open_ = [q for q in spec.quasi_identifiers if levels[q.column] < q.max_level]
        if not open_:
            raise DataError(
                f"{FIELD}.k",
                f"k={spec.k} cannot be reached: at the most general levels {levels} {small} of {n} rows "
                f"({small / n:.1%}) are in classes smaller than k, over max_suppression={spec.max_suppression:g}; "
                "lower k, raise max_suppression or a quasi-identifier's max_level, or widen its bucket",
            )
        widest = max(open_, key=lambda q: len(set(generalise(list(table[q.column]), q, levels[q.column]))))
        levels[widest.column] += 1


def anonymise(table: dict[str, Any], spec: KAnonymitySpec, levels: dict[str, int]) -> tuple[dict[str, Any], dict]:
    """Generalise the quasi-identifiers at `levels`, suppress rows in classes smaller than k, verify k.

    Returns the new table and a report: levels, rows in and out, suppressed rows and the achieved k.
    """
    classes = _classes(table, spec, levels)
    counts = Counter(classes)
    keep = np.array([counts[c] >= spec.k for c in classes], dtype=bool)
    out: dict[str, Any] = {}
    for name, column in table.items():
        levelled = next((q for q in spec.quasi_identifiers if q.column == name), None)
        if levelled is not None:
            column = generalise(list(column), levelled, levels[name])
        out[name] = (
            column[keep] if isinstance(column, np.ndarray) else [v for v, k in zip(column, keep, strict=True) if k]
        )
    achieved = min(Counter(_classes(out, spec, dict.fromkeys(levels, 0))).values(), default=0)
    if keep.any() and achieved < spec.k:  # cannot happen by construction; a release must never rely on that
        raise RuntimeError(f"k-anonymity verification failed: achieved k={achieved} < {spec.k}")
    report = {
        "k": spec.k,
        "achieved_k": int(achieved),
        "levels": levels,
        "rows": len(classes),
        "suppressed_rows": int((~keep).sum()),
    }
    return out, report


def achieved_k(table: dict[str, Any], columns: list[str]) -> int:
    """The size of the smallest equivalence class over `columns` (the k a table actually has)."""
    rows = list(zip(*(list(map(str, table[c])) for c in columns), strict=True))
    return min(Counter(rows).values(), default=0)
