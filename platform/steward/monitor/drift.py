"""Two-sample drift statistics: reference (training-time validation split) against current (a live window).

Binning is defined once here (`quantile_edges`, `bin_counts`, `category_counts`); the reference profile and the
streaming window both call these, so a live histogram lands on exactly the reference's bins.
Oracles: `ks_test` = `scipy.stats.ks_2samp`, `chi2_test` = `scipy.stats.chi2_contingency` on the 2 x k table,
`js_distance` = `scipy.spatial.distance.jensenshannon(base=2)`, `correct_pvalues("fdr")` =
`scipy.stats.false_discovery_control(method="bh")`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Literal

import numpy as np
from scipy import stats

Kind = Literal["auto", "numeric", "categorical", "counts"]
DEFAULT_ZERO_FILL = 1e-4


def _sample(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        raise ValueError(f"`{name}` is empty: a drift test needs at least one value on each side")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise ValueError(f"`{name}` contains NaN; drop or impute those values first")
    return arr


def quantile_edges(reference: Any, bins: int = 10) -> np.ndarray:
    """Interior bin edges at the reference's quantiles 1/bins, ..., (bins-1)/bins, de-duplicated.

    Bin i holds values in [edges[i-1], edges[i]); the first and last bins are open-ended, so live values outside
    the reference range still land in a bin. Ties (discrete features) merge bins, so there may be fewer than `bins`.
    """
    if bins < 2:
        raise ValueError(f"`bins` must be at least 2, got {bins}")
    ref = _sample("reference", reference).astype(float).ravel()
    return np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]))


def bin_counts(values: Any, edges: np.ndarray) -> np.ndarray:
    """Counts of `values` in the len(edges) + 1 bins of `quantile_edges`."""
    idx = np.searchsorted(edges, np.asarray(values, dtype=float).ravel(), side="right")
    return np.bincount(idx, minlength=len(edges) + 1)


def category_counts(values: Any, categories: list[Any]) -> np.ndarray:
    """Counts per category, plus a last cell for values outside `categories` (unseen at reference time)."""
    index = {c: i for i, c in enumerate(categories)}
    arr = np.asarray(values).ravel()
    idx = np.fromiter((index.get(v.item() if hasattr(v, "item") else v, len(categories)) for v in arr), int, arr.size)
    return np.bincount(idx, minlength=len(categories) + 1)


def _aligned_counts(reference: Any, current: Any, bins: int, kind: Kind) -> tuple[np.ndarray, np.ndarray]:
    """Both samples as counts on the same cells: reference-quantile bins, or the union of categories."""
    ref, cur = _sample("reference", reference), _sample("current", current)
    if kind == "auto":
        kind = "numeric" if ref.dtype.kind in "iuf" and cur.dtype.kind in "iuf" else "categorical"
    if kind == "counts":
        if ref.shape != cur.shape or ref.ndim != 1:
            raise ValueError(f"count vectors must be 1-D and aligned, got {ref.shape} and {cur.shape}")
        if (ref < 0).any() or (cur < 0).any() or ref.sum() == 0 or cur.sum() == 0:
            raise ValueError("count vectors must be non-negative with a positive total")
        return ref.astype(float), cur.astype(float)
    if kind == "numeric":
        edges = quantile_edges(ref, bins)
        return bin_counts(ref, edges).astype(float), bin_counts(cur, edges).astype(float)
    if kind == "categorical":
        cats = sorted(set(ref.ravel().tolist()) | set(cur.ravel().tolist()), key=str)
        return category_counts(ref, cats)[:-1].astype(float), category_counts(cur, cats)[:-1].astype(float)
    raise ValueError(f"`kind` must be auto, numeric, categorical or counts, got {kind!r}")


def psi(
    reference: Any, current: Any, bins: int = 10, *, kind: Kind = "auto", zero_fill: float = DEFAULT_ZERO_FILL
) -> float:
    """Population stability index: sum over cells of (c - r) * ln(c / r), with r, c the cell shares.

    Numeric values are binned on the reference's quantiles (`quantile_edges`); categorical values by category
    (the union of both sides); `kind="counts"` takes two aligned count vectors (a window's histogram on the
    reference bins). A share of exactly 0 would make the log infinite: it is replaced by `zero_fill` (default 1e-4,
    the common industry convention, without renormalising); `zero_fill=0` raises instead if a share is 0.
    Rule of thumb: < 0.1 stable, 0.1-0.2 moderate shift, > 0.2 significant shift.
    """
    r, c = _aligned_counts(reference, current, bins, kind)
    r, c = r / r.sum(), c / c.sum()
    if zero_fill > 0:
        r, c = np.where(r == 0, zero_fill, r), np.where(c == 0, zero_fill, c)
    elif (r == 0).any() or (c == 0).any():
        raise ValueError("a cell has share 0 and `zero_fill` is 0: PSI is infinite; set zero_fill > 0")
    return float(np.sum((c - r) * np.log(c / r)))


def js_distance(reference: Any, current: Any, bins: int = 10, *, kind: Kind = "auto") -> float:
    """Jensen-Shannon distance in base 2 (in [0, 1]) between the two samples' cell shares (cells as for `psi`).

    sqrt((KL(p || m) + KL(q || m)) / 2) with m = (p + q) / 2; equals scipy's `jensenshannon(p, q, base=2)`.
    Zero shares need no fill: 0 * log 0 = 0.
    """
    p, q = _aligned_counts(reference, current, bins, kind)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl_to_m(x: np.ndarray) -> float:
        nz = x > 0
        return float(np.sum(x[nz] * np.log(x[nz] / m[nz])))

    return float(np.sqrt(max(kl_to_m(p) + kl_to_m(q), 0.0) / (2 * np.log(2))))


def ks_test(reference: Any, current: Any) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test (two-sided): exactly `scipy.stats.ks_2samp` with its default method.

    scipy's exact/asymptotic p-value machinery is reused rather than re-derived; this adds input checks.
    """
    ref = _sample("reference", reference).astype(float).ravel()
    cur = _sample("current", current).astype(float).ravel()
    result = stats.ks_2samp(ref, cur)
    return float(result.statistic), float(result.pvalue)


def chi2_test(reference_counts: Any, current_counts: Any, correction: bool = True) -> tuple[float, float]:
    """Chi-squared test of homogeneity on the 2 x k table [reference_counts; current_counts].

    Equals `scipy.stats.chi2_contingency(table, correction=True)`: expected = row total * column total / total,
    dof = k - 1, and Yates' continuity correction when dof == 1. Cells empty on both sides are dropped first (they
    carry no information and would make scipy raise). Fewer than two non-empty cells: (0.0, 1.0).
    """
    ref = _sample("reference_counts", reference_counts).astype(float)
    cur = _sample("current_counts", current_counts).astype(float)
    problems = []
    if ref.shape != cur.shape or ref.ndim != 1:
        problems.append(f"count vectors must be 1-D and aligned, got {ref.shape} and {cur.shape}")
    elif (ref < 0).any() or (cur < 0).any():
        problems.append("counts must be non-negative")
    elif ref.sum() == 0 or cur.sum() == 0:
        problems.append("`reference_counts` and `current_counts` each need a positive total")
    if problems:
        raise ValueError("; ".join(problems))
    table = np.stack([ref, cur])[:, (ref + cur) > 0]
    if table.shape[1] < 2:
        return 0.0, 1.0
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    dof = table.shape[1] - 1
    if correction and dof == 1:
        # Yates: move each observed cell 0.5 towards its expected value, never past it (scipy's rule)
        diff = expected - table
        table = table + np.sign(diff) * np.minimum(0.5, np.abs(diff))
    statistic = float(np.sum((table - expected) ** 2 / expected))
    return statistic, float(stats.chi2.sf(statistic, dof))


def correct_pvalues(pvalues: Any, method: Literal["bonferroni", "fdr"] = "bonferroni") -> np.ndarray:
    """Adjusted p-values for testing many signals at once; compare each to the threshold as usual.

    "bonferroni": min(1, m * p) (family-wise error). "fdr": Benjamini-Hochberg step-up adjusted p-values, equal to
    `scipy.stats.false_discovery_control(p, method="bh")` (false discovery rate).
    """
    p = _sample("pvalues", pvalues).astype(float).ravel()
    if ((p < 0) | (p > 1)).any():
        raise ValueError("`pvalues` must lie in [0, 1]")
    m = p.size
    if method == "bonferroni":
        return np.minimum(1.0, p * m)
    if method == "fdr":
        order = np.argsort(p)
        scaled = p[order] * m / np.arange(1, m + 1)
        # step-up: each adjusted value is the smallest scaled value at or after its rank
        adjusted = np.minimum.accumulate(scaled[::-1])[::-1]
        out = np.empty(m)
        out[order] = np.minimum(adjusted, 1.0)
        return out
    raise ValueError(f"`method` must be 'bonferroni' or 'fdr', got {method!r}")


def _rbf_pooled(pooled: np.ndarray) -> np.ndarray:
    """RBF kernel matrix exp(-d^2 / (2 s^2)) with s the median pairwise distance (median heuristic).

    If more than half the pairs coincide (median 0), s falls back to the median of the positive distances, or 1.
    Built in place in one N x N buffer: each extra temporary would be another N x N pass over memory.
    """
    sq = np.einsum("ij,ij->i", pooled, pooled)
    d2 = pooled @ pooled.T
    d2 *= -2.0
    d2 += sq[:, None]
    d2 += sq[None, :]
    np.maximum(d2, 0.0, out=d2)
    off = d2[_upper_triangle(len(pooled))]  # the same values, in the same order, as d2[np.triu_indices(N, k=1)]
    med = _median(off)
    if med <= 0:
        positive = off[off > 0]
        med = _median(positive) if positive.size else 1.0
    # median of squared distances = square of the median distance (monotone), so s^2 = med
    d2 *= -1.0 / (2.0 * med)
    return np.exp(d2, out=d2)


def _median(values: np.ndarray) -> float:
    """`np.median(values)`, exactly, and faster for the tens of thousands of distances of a monitor's window: the
    middle values almost always lie between two quantiles of a 1/16 subsample, and only that band is partitioned.
    `values` is reordered."""
    size = len(values)
    middle = [(size - 1) // 2, size // 2]  # one index twice for an odd size
    if size >= 4096:
        low, high = np.quantile(values[::16], [0.45, 0.55])
        below = int(np.count_nonzero(values < low))
        band = values[(values >= low) & (values <= high)]
        at = [i - below for i in middle]  # the middle values' ranks within the band, if they fell in it
        if at[0] >= 0 and at[1] < len(band):
            band.partition(at)
            return float((band[at[0]] + band[at[1]]) / 2)
    values.partition(middle)
    return float((values[middle[0]] + values[middle[1]]) / 2)


@lru_cache(maxsize=4)
def _upper_triangle(size: int) -> np.ndarray:
    """Boolean mask of the pairs i < j; cached because the monitor tests windows of one size over and over, and a
    boolean mask is cheaper than `np.triu_indices` (two int64 index arrays) and its gather."""
    mask = np.triu(np.ones((size, size), dtype=bool), k=1)
    mask.flags.writeable = False
    return mask


def _as_points(name: str, values: Any) -> np.ndarray:
    arr = _sample(name, values).astype(float)
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] < 2:
        raise ValueError(f"`{name}` must be (n, d) with n >= 2, got shape {arr.shape}")
    return arr


def mmd_test(
    reference: Any, current: Any, n_permutations: int = 100, seed: int | np.random.Generator | None = 0
) -> tuple[float, float]:
    """Permutation test of maximum mean discrepancy with an RBF kernel (median-heuristic bandwidth).

    statistic = biased MMD^2 = mean K(x, x') + mean K(y, y') - 2 mean K(x, y); p = (1 + k) / (1 + B), where k is
    the number of the B label permutations whose statistic is >= the observed one.
    Fast path: the pooled kernel matrix is computed once; with a = 1/n on reference rows and -1/m on current rows,
    MMD^2 = a' K a, so all permutations are one (B x N) @ (N x N) product.
    """
    x, y = _as_points("reference", reference), _as_points("current", current)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"`reference` has {x.shape[1]} dimensions but `current` has {y.shape[1]}")
    if n_permutations < 1:
        raise ValueError(f"`n_permutations` must be at least 1, got {n_permutations}")
    n, m = len(x), len(y)
    kernel = _rbf_pooled(np.concatenate([x, y]))
    weights = np.concatenate([np.full(n, 1.0 / n), np.full(m, -1.0 / m)])
    rng = np.random.default_rng(seed)
    # row 0 is the observed split; the others are permutations of the same weights, all shuffled in one call (the
    # same draws as one `rng.permutation(n + m)` a row, with less per-call overhead)
    a = np.vstack([weights, rng.permuted(np.tile(weights, (n_permutations, 1)), axis=1)])
    values = np.einsum("bi,bi->b", a, a @ kernel)  # the kernel is symmetric: a K = (K a')'
    observed = float(values[0])
    # statistics are O(1) (kernel values lie in [0, 1]): an absolute 1e-12 absorbs summation-order rounding, so ties
    # (e.g. a permutation that reproduces the observed split) count as >= wherever they are computed
    k = int(np.sum(values[1:] >= observed - 1e-12))
    return observed, (1 + k) / (1 + n_permutations)
