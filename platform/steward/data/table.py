"""A table: named columns of equal length, the one in-memory shape every source is loaded into."""

from typing import Any

import numpy as np

Table = dict[str, Any]  # column name -> list or numpy array, all of the same length


def num_rows(table: Table) -> int:
    """Number of rows of a table (0 for a table without columns)."""
    return len(next(iter(table.values()))) if table else 0


def take(table: Table, rows: np.ndarray) -> Table:
    """The given rows of every column, in the given order."""
    out: Table = {}
    for name, column in table.items():
        out[name] = column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows]
    return out
