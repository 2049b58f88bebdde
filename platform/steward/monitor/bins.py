"""The reference's bins: what live traffic is histogrammed on, so windows and the reference compare cell by cell."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


class Bins:
    """The reference's bins for the histogrammed signals: interior edges per numeric one, categories per categorical.

    Numeric bin i holds [edges[i-1], edges[i]) as in `drift.quantile_edges`; each numeric histogram has one more
    cell at the end for missing values (NaN). Each categorical histogram has a last cell for unseen categories.
    """

    def __init__(self, numeric: dict[str, Any] | None = None, categorical: dict[str, Sequence[Any]] | None = None):
        self.numeric = {name: np.asarray(e, dtype=float).ravel() for name, e in (numeric or {}).items()}
        self.categorical = {name: list(c) for name, c in (categorical or {}).items()}
        self.category_index = {name: {v: i for i, v in enumerate(c)} for name, c in self.categorical.items()}
        self.names = list(self.numeric)
        width = max((len(e) for e in self.numeric.values()), default=0)
        # all features' edges in one +inf-padded matrix, so one record is binned with one vectorised comparison
        self._edges = np.full((len(self.names), max(width, 1)), np.inf)
        for i, e in enumerate(self.numeric.values()):
            self._edges[i, : len(e)] = e
        self.missing_column = width + 1
        self._rows = np.arange(len(self.names))

    def index(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each numeric value, (..., F) -> (..., F); NaN goes to the missing column."""
        idx = (values[..., None] >= self._edges).sum(-1)
        return np.where(np.isnan(values), self.missing_column, idx)

    def empty_histograms(self) -> np.ndarray:
        return np.zeros((len(self.names), self.missing_column + 1), dtype=np.int64)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Bins) and self.to_dict() == other.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": {k: v.tolist() for k, v in self.numeric.items()}, "categorical": self.categorical}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bins:
        return cls(data.get("numeric"), data.get("categorical"))
