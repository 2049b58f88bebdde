"""Verbatim regurgitation: how many of the n-grams a language model generates occur in its training text.

Training's end saves a compact set of the training text's token n-grams beside the model (`ngrams.npz`: sorted unique
64-bit hashes); serving counts, of each generated text's n-grams, those found in it. A set over `MAX_NGRAMS` keeps only
the hashes at or below a cut (a fixed share of the hash space), and a lookup judges only the generated n-grams hashed
at or below the same cut: the share found stays an unbiased estimate of the whole set's at a bounded size (32 MB).
Pure numpy; the file is read without pickle.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from steward.errors import StewardError

NGRAMS_FILE = "ngrams.npz"
MAX_NGRAMS = 4_000_000
_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a's 64-bit prime: mixes one token id into the running hash
_ALL = np.iinfo(np.uint64).max


def ngram_hashes(ids: np.ndarray | list[int], n: int) -> np.ndarray:
    """The 64-bit hash of every run of `n` consecutive token ids in `ids` (none when fewer than `n`)."""
    arr = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    if arr.size < n:
        return np.empty(0, dtype=np.uint64)
    windows = sliding_window_view(arr, n)
    h = np.full(len(windows), np.uint64(0xCBF29CE484222325))
    with np.errstate(over="ignore"):
        for i in range(n):
            h = (h ^ windows[:, i]) * _MULTIPLIER
        # splitmix64's finaliser: neighbouring n-grams land far apart, so a cut keeps a uniform share of them
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


@dataclass(frozen=True)
class NgramSet:
    """Hashes of the training text's `n`-grams at or below `cut` (the whole hash space unless the set was capped)."""

    hashes: np.ndarray  # sorted, unique, uint64
    n: int
    cut: int = int(_ALL)

    @classmethod
    def build(cls, texts: Iterable[np.ndarray | list[int]], n: int, max_size: int = MAX_NGRAMS) -> NgramSet:
        """The set of every text's n-grams (each text is its token ids, without padding)."""
        parts = [ngram_hashes(ids, n) for ids in texts]
        hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        if len(hashes) <= max_size:
            return cls(hashes, n)
        return cls(hashes[:max_size], n, int(hashes[max_size - 1]))

    def count(self, ids: np.ndarray | list[int]) -> tuple[int, int]:
        """(n-grams of `ids` found in the set, n-grams of `ids` judged): the judged are those at or below the cut."""
        h = ngram_hashes(ids, self.n)
        h = h[h <= np.uint64(self.cut)]
        if not len(h) or not len(self.hashes):
            return 0, len(h)
        at = np.searchsorted(self.hashes, h).clip(max=len(self.hashes) - 1)
        return int((self.hashes[at] == h).sum()), len(h)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / NGRAMS_FILE
        np.savez(path, hashes=self.hashes, n=np.int64(self.n), cut=np.uint64(self.cut))
        return path


def load_ngrams(directory: str | Path) -> NgramSet | None:
    """The set saved in `directory`, None when there is none; a file that is not one is refused, never trusted."""
    path = Path(directory) / NGRAMS_FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            hashes, n, cut = npz["hashes"], int(npz["n"]), int(npz["cut"])
    except (OSError, ValueError, KeyError) as err:
        raise StewardError(f"{path} is not a steward n-gram set ({err}); retrain the run to write it again") from None
    ordered = hashes.ndim == 1 and hashes.dtype == np.uint64 and bool(np.all(hashes[1:] > hashes[:-1]))
    if not ordered or not 4 <= n <= 64 or len(hashes) > MAX_NGRAMS:
        raise StewardError(f"{path} is not a steward n-gram set (malformed hashes or n); retrain the run")
    return NgramSet(hashes, n, cut)
