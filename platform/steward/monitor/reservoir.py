"""A mergeable reservoir sample: a uniform sample of fixed size from a stream, and from the union of several streams.

Used for embeddings (MMD needs points, not histograms) and any other signal tested on raw values. Each replica keeps
its own reservoir; `merge` combines two so the result is again a uniform sample of everything both have seen.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SampleSpec:
    """How a window state keeps one named sample: at most `capacity` rows, stored as `dtype`."""

    capacity: int = 1000
    dtype: str = "float32"


class Reservoir:
    """Uniform sample of at most `capacity` rows of dimension `dim` (Vitter's Algorithm R), stored as `dtype`
    (float32; float16 halves what a push of embeddings weighs, at a relative rounding of 5e-4).

    Invariant: after `seen` rows, `sample` is a uniformly random subset of size min(seen, capacity) of them.
    """

    def __init__(self, capacity: int, dim: int, seed: int | None = None, dtype: Any = np.float32) -> None:
        if capacity < 1 or dim < 1:
            raise ValueError(f"`capacity` and `dim` must be positive, got {capacity} and {dim}")
        self.capacity, self.dim, self.seen = capacity, dim, 0
        self._rows = np.empty((capacity, dim), dtype=dtype)
        self._rng = random.Random(seed)  # the stdlib generator: a scalar draw costs less than numpy's

    @property
    def sample(self) -> np.ndarray:
        return self._rows[: min(self.seen, self.capacity)]

    def add(self, row: Any) -> None:
        """Offer one row: kept with probability capacity / seen, replacing a uniformly chosen kept row."""
        self.seen += 1
        if self.seen <= self.capacity:
            self._rows[self.seen - 1] = row
            return
        j = self._rng.randrange(self.seen)
        if j < self.capacity:
            self._rows[j] = row

    def add_batch(self, rows: Any) -> None:
        """`add` each row in order, with the same random draws, but the rows copied in two numpy writes rather than a
        row at a time (a replica's push fills its fresh reservoir with one slice)."""
        rows = np.asarray(rows).reshape(-1, self.dim)  # cast as rows are stored: only the kept ones
        fill = min(max(self.capacity - self.seen, 0), len(rows))
        self._rows[self.seen : self.seen + fill] = rows[:fill]
        first, self.seen = self.seen + fill + 1, self.seen + len(rows)
        draws = (self._rng.randrange(seen) for seen in range(first, self.seen + 1))
        # a later row drawn into the same slot replaces the earlier one, as one by one: the dict keeps the last
        slots = {j: i for i, j in enumerate(draws, start=fill) if j < self.capacity}
        if slots:
            self._rows[list(slots)] = rows[list(slots.values())]

    def merge(self, other: Reservoir) -> Reservoir:
        """A uniform sample of the union of both streams, of the smaller capacity (and this side's dtype).

        The number h of output rows drawn from this side is hypergeometric (capacity draws, without replacement,
        from seen_a rows of one kind and seen_b of the other); h rows are then a uniform subset of this side's
        sample (itself uniform over its stream, and holding at least h rows) and capacity - h of the other's. So
        every capacity-subset of the union is equally likely, and Algorithm R can continue from the merged state.
        """
        if other.dim != self.dim:
            raise ValueError(f"cannot merge reservoirs of {self.dim} and {other.dim} dimensions")
        capacity = min(self.capacity, other.capacity)
        out = Reservoir(capacity, self.dim, seed=self._rng.getrandbits(64), dtype=self._rows.dtype)
        out.seen = self.seen + other.seen
        if out.seen <= capacity:
            out._rows[: out.seen] = np.concatenate([self.sample, other.sample])
            return out
        rng = np.random.default_rng(self._rng.getrandbits(64))
        h = int(rng.hypergeometric(self.seen, other.seen, capacity))
        mine = self.sample[rng.choice(len(self.sample), h, replace=False)]
        theirs = other.sample[rng.choice(len(other.sample), capacity - h, replace=False)]
        out._rows[:] = np.concatenate([mine, theirs])
        return out

    def copy(self) -> Reservoir:
        out = Reservoir(self.capacity, self.dim, seed=self._rng.getrandbits(64), dtype=self._rows.dtype)
        out.seen, out._rows[:] = self.seen, self._rows
        return out

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (a replica's push to the monitor) with the kept rows only, not the capacity-sized buffer, so a
        push stays small enough for Ray to send inline with the call (under 100 KB) rather than through the object
        store."""
        return {**self.__dict__, "_rows": self.sample}

    def __setstate__(self, state: dict[str, Any]) -> None:
        kept = state.pop("_rows")
        self.__dict__.update(state)
        self._rows = np.empty((self.capacity, self.dim), dtype=kept.dtype)
        self._rows[: len(kept)] = kept

    def to_dict(self) -> dict[str, Any]:
        """Plain data; the random generator is not kept (a restored reservoir is reseeded, still uniform).

        The rows are their little-endian bytes in base64: exact, and far cheaper to write and read than JSON number
        lists, which matters as the monitor saves its full reservoirs every persist_interval_s.
        """
        dtype = self._rows.dtype.newbyteorder("<")
        rows = base64.b64encode(np.ascontiguousarray(self.sample, dtype=dtype).tobytes()).decode("ascii")
        return {"capacity": self.capacity, "dim": self.dim, "seen": self.seen, "rows": rows, "dtype": dtype.name}

    @classmethod
    def from_dict(cls, data: dict[str, Any], seed: int | None = None) -> Reservoir:
        dtype = np.dtype(data.get("dtype", "float32")).newbyteorder("<")  # float32 in states saved before dtypes
        out = cls(int(data["capacity"]), int(data["dim"]), seed=seed, dtype=dtype.newbyteorder("="))
        out.seen = int(data["seen"])
        rows = data["rows"]  # base64 bytes, or a list of rows (states saved before that)
        rows = np.frombuffer(base64.b64decode(rows), dtype) if isinstance(rows, str) else np.asarray(rows, dtype)
        rows = rows.reshape(-1, out.dim)
        if len(rows) != min(out.seen, out.capacity):
            raise ValueError(f"reservoir dict holds {len(rows)} rows but seen={out.seen}, capacity={out.capacity}")
        out._rows[: len(rows)] = rows
        return out
