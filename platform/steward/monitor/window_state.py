"""Streaming window state: what a replica keeps about live traffic, mergeable exactly across replicas.

A `WindowState` holds only statistics: per-group prediction counts and confusion counts, per-feature histograms on
the reference's bins (`Bins`), reservoir samples (e.g. embeddings, for MMD) and named totals (e.g. personal-data
values found in generated text). States add exactly (`merge`), so
replicas can each keep one and a monitor can sum them; `to_dict`/`from_dict` give plain data for persistence.

Labels may arrive after the prediction (feedback by request id). A prediction with a request id waits in
`pending_predictions` and a label in `pending_labels`; when both sides of an id meet (in `add_feedback` or in
`merge`, whichever replica saw which) they become one confusion count. A labelled record is therefore counted in
the window where its label arrives. Pending maps are bounded (`max_pending`, oldest dropped first, counted in
`evicted`); merge is exact, and order-independent, as long as nothing is evicted.

`steward.monitor.windowing.Windows` cuts a stream of states into windows by record count or by time.
"""

from __future__ import annotations

import itertools
import time
import zlib
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from steward.monitor.bias import GroupCounts
from steward.monitor.bins import Bins
from steward.monitor.reservoir import Reservoir, SampleSpec


def _plain(value: Any) -> Any:
    """numpy scalars become Python ones, so keys hash alike and the state serialises to JSON."""
    return value.item() if isinstance(value, np.generic) else value


def _add_counts(target: dict[Any, int], *sources: dict[Any, int]) -> None:
    for source in sources:
        for key, count in source.items():
            target[key] = target.get(key, 0) + count


class WindowState:
    """Mergeable statistics of one window (or one pane, or one replica's delta)."""

    def __init__(
        self,
        bins: Bins | None = None,
        reservoir_capacity: int = 1000,
        max_pending: int = 100_000,
        seed: int | None = None,
        samples: Mapping[str, SampleSpec] | None = None,
    ) -> None:
        """`samples` sets the capacity and dtype of named reservoirs (the others keep `reservoir_capacity` float32
        rows); `seed` makes the reservoirs' choices reproducible (tests); leave it None in replicas so their choices
        are independent."""
        self.bins = bins or Bins()
        self.reservoir_capacity, self.max_pending, self.seed = reservoir_capacity, max_pending, seed
        self.samples = dict(samples or {})
        self.n, self.evicted = 0, 0
        self.invalid = 0  # records refused as invalid (e.g. a non-finite model output): never counted in n
        self.start: float | None = None
        self.end: float | None = None
        self.predicted: dict[tuple[Hashable, Hashable], int] = {}  # (group, predicted class) -> records
        self.confusion: dict[tuple[Hashable, Hashable, Hashable], int] = {}  # (group, label, predicted) -> records
        self.histograms = self.bins.empty_histograms()
        self.categorical = {name: np.zeros(len(c) + 1, dtype=np.int64) for name, c in self.bins.categorical.items()}
        self.totals: dict[str, int] = {}  # named counts summed over records (e.g. "pii.email")
        self.reservoirs: dict[str, Reservoir] = {}
        self.pending_predictions: dict[Hashable, tuple[Hashable, Hashable]] = {}
        self.pending_labels: dict[Hashable, Hashable] = {}

    def add(
        self,
        prediction: Any,
        group: Any = None,
        features: Any = None,
        categories: dict[str, Any] | None = None,
        samples: dict[str, Any] | None = None,
        request_id: Any = None,
        t: float | None = None,
    ) -> None:
        """Count one served record. `features` are the numeric values in `bins.names` order; `categories` maps a
        categorical signal to its value; `samples` maps a reservoir name (e.g. "embedding") to one row.
        A malformed record raises ValueError before anything is counted."""
        x = None if features is None else np.asarray(features, dtype=float)
        if x is not None and x.shape != (len(self.bins.names),):
            raise ValueError(f"`features` must hold {len(self.bins.names)} values ({self.bins.names}), got {x.shape}")
        if categories and not categories.keys() <= self.bins.category_index.keys():
            raise ValueError(
                f"unknown categorical signals {sorted(categories.keys() - self.bins.category_index.keys())}"
            )
        t = time.time() if t is None else t
        self.start = t if self.start is None else min(self.start, t)
        self.end = t if self.end is None else max(self.end, t)
        self.n += 1
        group, prediction = _plain(group), _plain(prediction)
        key = (group, prediction)
        self.predicted[key] = self.predicted.get(key, 0) + 1
        if x is not None:
            self.histograms[self.bins._rows, self.bins.index(x)] += 1
        for name, value in (categories or {}).items():
            index = self.bins.category_index[name]
            self.categorical[name][index.get(_plain(value), len(index))] += 1
        for name, row in (samples or {}).items():
            self._reservoir(name, np.size(row)).add(row)
        if request_id is not None:
            self._pend(self.pending_predictions, _plain(request_id), (group, prediction))
            self._match(_plain(request_id))

    def add_batch(
        self,
        predictions: Any,
        groups: Any = None,
        features: Any = None,
        samples: dict[str, Any] | None = None,
        t: float | tuple[float, float] | None = None,
        categories: dict[str, Any] | None = None,
        request_ids: Sequence[Any] | None = None,
        totals: Mapping[str, int] | None = None,
    ) -> None:
        """Count many records at once (vectorised histograms), as `add` would one by one.

        `features` is (n, F) in `bins.names` order; `samples` maps a reservoir name to (n, d) rows; `categories`
        maps a categorical signal to n values; `t` is one time or the (first, last) record times; `totals` are
        added to the state's named totals.
        """
        _add_counts(self.totals, dict(totals or {}))
        preds = list(map(_plain, np.asarray(predictions, dtype=object).ravel().tolist()))
        grps = [None] * len(preds) if groups is None else list(map(_plain, groups))
        keys = list(zip(grps, preds, strict=True))
        _add_counts(self.predicted, Counter(keys))  # Counter counts in C: no dict update per record in Python
        if features is not None:
            idx = self.bins.index(np.asarray(features, dtype=float).reshape(len(preds), -1))
            flat = (self.bins._rows * self.histograms.shape[1] + idx).ravel()
            self.histograms += np.bincount(flat, minlength=self.histograms.size).reshape(self.histograms.shape)
        for name, values in (categories or {}).items():
            index, cells = self.bins.category_index[name], self.categorical[name]
            for value, count in Counter(map(_plain, values)).items():
                cells[index.get(value, len(index))] += count
        for name, rows in (samples or {}).items():
            rows = np.asarray(rows).reshape(len(preds), -1)
            self._reservoir(name, rows.shape[1]).add_batch(rows)
        first, last = t if isinstance(t, tuple) else (time.time() if t is None else t,) * 2
        self.start = first if self.start is None else min(self.start, first)
        self.end = last if self.end is None else max(self.end, last)
        self.n += len(preds)
        if request_ids is not None:
            self._pend_predictions(list(map(_plain, request_ids)), keys)

    def _pend_predictions(self, request_ids: list[Hashable], keys: list[tuple[Hashable, Hashable]]) -> None:
        """`_pend` then `_match` for each (request id, (group, prediction)) in order; in one dict update when that
        gives the same state: no label waits for these ids, and nothing can be evicted out of turn (a repeated id
        would be re-inserted after an eviction one by one, but updated in place in bulk)."""
        pending = self.pending_predictions
        fits = len(pending) + len(request_ids) <= self.max_pending
        if self.pending_labels.keys().isdisjoint(request_ids) and (
            fits or (pending.keys().isdisjoint(request_ids) and len(set(request_ids)) == len(request_ids))
        ):
            pending.update(zip(request_ids, keys, strict=False))
            self._trim(pending)
            return
        for request_id, key in zip(request_ids, keys, strict=False):
            self._pend(pending, request_id, key)
            self._match(request_id)

    def add_feedback(self, request_id: Any, label: Any) -> bool:
        """Record a late label; True if its prediction is in this state and was counted now."""
        self._pend(self.pending_labels, _plain(request_id), _plain(label))
        return self._match(_plain(request_id))

    def _reservoir(self, name: str, dim: int) -> Reservoir:
        if name not in self.reservoirs:
            # crc32, not hash(): str hashes differ between processes
            seed = None if self.seed is None else self.seed * 2**32 + zlib.crc32(name.encode())
            spec = self.samples.get(name, SampleSpec(self.reservoir_capacity))
            self.reservoirs[name] = Reservoir(spec.capacity, dim, seed=seed, dtype=spec.dtype)
        return self.reservoirs[name]

    def _pend(self, pending: dict[Hashable, Any], key: Hashable, value: Any) -> None:
        pending[key] = value
        self._trim(pending)

    def _trim(self, pending: dict[Hashable, Any]) -> None:
        """Drop the oldest entries over max_pending (dicts keep insertion order) in one pass: taking them one at a
        time from the front would rescan the slots already emptied each time."""
        excess = len(pending) - self.max_pending
        if excess > 0:
            for key in list(itertools.islice(pending, excess)):
                del pending[key]
            self.evicted += excess

    def _match(self, request_id: Hashable) -> bool:
        if request_id not in self.pending_predictions or request_id not in self.pending_labels:
            return False
        group, prediction = self.pending_predictions.pop(request_id)
        key = (group, self.pending_labels.pop(request_id), prediction)
        self.confusion[key] = self.confusion.get(key, 0) + 1
        return True

    def merge(self, other: WindowState) -> WindowState:
        """The state of both streams together: counts and histograms add, reservoirs merge uniformly, pending
        predictions and labels from either side are matched. A new state; neither side changes."""
        return self.copy().update(other)

    def copy(self) -> WindowState:
        out = self._empty()
        out.n, out.evicted, out.start, out.end = self.n, self.evicted, self.start, self.end
        out.invalid = self.invalid
        out.predicted, out.confusion = dict(self.predicted), dict(self.confusion)
        out.histograms = self.histograms.copy()
        out.categorical = {k: v.copy() for k, v in self.categorical.items()}
        out.totals = dict(self.totals)
        out.reservoirs = {k: r.copy() for k, r in self.reservoirs.items()}
        out.pending_predictions, out.pending_labels = dict(self.pending_predictions), dict(self.pending_labels)
        return out

    def update(self, other: WindowState) -> WindowState:
        """Add `other`'s stream into this state, in place (as `merge`, which calls it); returns self.

        The monitor's open pane takes every pushed delta this way: its cost follows the delta, not the up to
        `max_pending` predictions waiting here for a label (which `merge` copies).
        """
        if other.bins is not self.bins and self.bins != other.bins:
            raise ValueError("cannot merge window states built on different reference bins")
        self.n, self.evicted, self.invalid = (
            self.n + other.n,
            self.evicted + other.evicted,
            self.invalid + other.invalid,
        )
        starts = [s for s in (self.start, other.start) if s is not None]
        ends = [e for e in (self.end, other.end) if e is not None]
        self.start, self.end = (min(starts) if starts else None), (max(ends) if ends else None)
        _add_counts(self.predicted, other.predicted)
        _add_counts(self.confusion, other.confusion)
        self.histograms = self.histograms + other.histograms
        self.categorical = {k: v + other.categorical[k] for k, v in self.categorical.items()}
        _add_counts(self.totals, other.totals)
        for name, theirs in other.reservoirs.items():
            mine = self.reservoirs.get(name)
            self.reservoirs[name] = mine.merge(theirs) if mine else theirs.copy()
        # match across the two sides before bounding, so the cap never drops a pair that could meet. Only ids from
        # `other` can meet: within one state a prediction and its label are matched as soon as both are there.
        self.pending_predictions.update(other.pending_predictions)
        self.pending_labels.update(other.pending_labels)
        for rid in [*other.pending_labels, *other.pending_predictions]:
            self._match(rid)
        self._trim(self.pending_predictions)
        self._trim(self.pending_labels)
        return self

    def take_pending(self) -> WindowState:
        """Move the unmatched predictions and labels into a fresh state (the next pane); this one keeps none."""
        nxt = self._empty()
        nxt.pending_predictions, self.pending_predictions = self.pending_predictions, {}
        nxt.pending_labels, self.pending_labels = self.pending_labels, {}
        return nxt

    def _empty(self) -> WindowState:
        """A state with no records, kept as this one keeps them."""
        return WindowState(self.bins, self.reservoir_capacity, self.max_pending, self.seed, self.samples)

    def group_counts(self, positive: Any = 1) -> dict[Hashable, GroupCounts]:
        """Per-group counts one-vs-rest for `positive`, ready for `bias.*_from_counts`."""
        cells: dict[Hashable, list[int]] = {}
        for (group, pred), count in self.predicted.items():
            c = cells.setdefault(group, [0] * 6)
            c[0] += count
            c[1] += count if pred == positive else 0
        for (group, label, pred), count in self.confusion.items():
            c = cells.setdefault(group, [0] * 6)
            c[2 + 2 * (label != positive) + (pred != positive)] += count  # tp, fn, fp, tn
        return {g: GroupCounts(*c) for g, c in cells.items()}

    def class_counts(self) -> dict[Hashable, int]:
        """Records per predicted class, over all groups."""
        out: dict[Hashable, int] = {}
        for (_, pred), count in self.predicted.items():
            out[pred] = out.get(pred, 0) + count
        return out

    def histogram(self, name: str) -> np.ndarray:
        """Counts on the reference bins of a numeric signal (without the missing cell) or a categorical one (with
        the unseen-category cell)."""
        if name in self.categorical:
            return self.categorical[name]
        i = self.bins.names.index(name)
        return self.histograms[i, : len(self.bins.numeric[name]) + 1]

    def to_dict(self, pending: bool = True) -> dict[str, Any]:
        """Plain lists and numbers (JSON-ready when groups, classes and request ids are JSON scalars); without the
        predictions and labels waiting for their other half when not `pending` (`pending_to_dict` has them)."""
        return {
            "version": 1,
            "n": self.n,
            "start": self.start,
            "end": self.end,
            "evicted": self.evicted,
            "invalid": self.invalid,
            "reservoir_capacity": self.reservoir_capacity,
            "max_pending": self.max_pending,
            "samples": {name: [spec.capacity, spec.dtype] for name, spec in self.samples.items()},
            "bins": self.bins.to_dict(),
            "predicted": [[g, p, c] for (g, p), c in self.predicted.items()],
            "confusion": [[g, y, p, c] for (g, y, p), c in self.confusion.items()],
            "histograms": self.histograms.tolist(),
            "categorical": {k: v.tolist() for k, v in self.categorical.items()},
            "totals": self.totals,
            "reservoirs": {k: r.to_dict() for k, r in self.reservoirs.items()},
            **(self.pending_to_dict() if pending else {}),
        }

    def pending_to_dict(self) -> dict[str, Any]:
        """The predictions and labels waiting for their other half, as plain data."""
        # by column: three lists of scalars, not a list per pending id (up to max_pending), which the garbage
        # collector would walk on every save
        return {
            "pending_predictions": {
                "ids": list(self.pending_predictions),
                "groups": [g for g, _ in self.pending_predictions.values()],
                "predictions": [p for _, p in self.pending_predictions.values()],
            },
            "pending_labels": {"ids": list(self.pending_labels), "labels": list(self.pending_labels.values())},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WindowState:
        if data.get("version") != 1:
            raise ValueError(f"unknown window state version {data.get('version')!r}; expected 1")
        samples = {name: SampleSpec(int(c), dtype) for name, (c, dtype) in data.get("samples", {}).items()}
        capacity, max_pending = int(data["reservoir_capacity"]), int(data["max_pending"])
        out = cls(Bins.from_dict(data["bins"]), capacity, max_pending, samples=samples)
        out.n, out.evicted, out.start, out.end = int(data["n"]), int(data["evicted"]), data["start"], data["end"]
        out.invalid = int(data.get("invalid", 0))  # saved before invalid records were counted: none
        # JSON turns tuples into lists; keys must be hashable again
        key = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        out.predicted = {(key(g), key(p)): int(c) for g, p, c in data["predicted"]}
        out.confusion = {(key(g), key(y), key(p)): int(c) for g, y, p, c in data["confusion"]}
        out.histograms = np.asarray(data["histograms"], dtype=np.int64).reshape(out.histograms.shape)
        out.categorical = {k: np.asarray(v, dtype=np.int64) for k, v in data["categorical"].items()}
        out.totals = {str(k): int(v) for k, v in data.get("totals", {}).items()}  # saved before totals: none
        out.reservoirs = {k: Reservoir.from_dict(r) for k, r in data["reservoirs"].items()}
        if "pending_predictions" in data:
            out.restore_pending(data)
        return out

    def restore_pending(self, data: dict[str, Any]) -> None:
        """Take the waiting predictions and labels `pending_to_dict` saved (by column, or by row: older saves)."""
        key = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        predictions, labels = data["pending_predictions"], data["pending_labels"]
        if isinstance(predictions, dict):
            predictions = zip(predictions["ids"], predictions["groups"], predictions["predictions"], strict=True)
        if isinstance(labels, dict):
            labels = zip(labels["ids"], labels["labels"], strict=True)
        self.pending_predictions = {key(rid): (key(g), key(p)) for rid, g, p in predictions}
        self.pending_labels = {key(rid): key(y) for rid, y in labels}
