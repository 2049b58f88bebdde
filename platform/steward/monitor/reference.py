"""The reference profile: what live traffic is compared against, computed from arrays of the validation split.

Training calls these on the validation split and saves the result beside the checkpoint (`save_reference`);
serving loads it (`reference_for`: an int8 deployment's own profile, else training's) and builds its window bins
from it (`ReferenceProfile.bins`), so live histograms are counted on exactly the reference's bins. Pure numpy: whoever
runs the model passes arrays in.

On disk: `reference.json` (profiles, rates, metadata; NaN written as null) and `reference.npz` (the samples:
embedding reservoir, feature rows), loaded without pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from steward.errors import StewardError
from steward.monitor.bias import group_counts
from steward.monitor.bins import Bins
from steward.monitor.drift import bin_counts, category_counts, quantile_edges

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
CONFIDENCE, PREDICTED_CLASS = "prediction.confidence", "prediction.class"
TEXT_LENGTH, TEXT_UNK_RATE = "text.length", "text.unk_rate"
RESERVED = {CONFIDENCE, PREDICTED_CLASS, TEXT_LENGTH, TEXT_UNK_RATE}
FORMAT_VERSION = 1
INT8_REFERENCE = "int8"  # model/int8/: the profile of the int8 model, for int8 deployments (model/: training's)


@dataclass
class FeatureProfile:
    """One signal's reference distribution: counts on its bins (numeric: quantile bins, `drift.quantile_edges`;
    categorical: one cell per category), quantiles, and how many values were missing (NaN)."""

    name: str
    kind: Literal["numeric", "categorical"]
    n: int
    counts: list[int]
    edges: list[float] = field(default_factory=list)
    categories: list[Any] = field(default_factory=list)
    quantiles: dict[str, float] = field(default_factory=dict)
    missing: int = 0


def feature_profile(values: Any, name: str, bins: int = 10, kind: str = "auto") -> FeatureProfile:
    """Profile one signal. Numeric: quantile edges, counts, and the `QUANTILES`; categorical: counts per category
    (sorted by their string form). NaN values are counted in `missing` and left out of the rest."""
    arr = np.asarray(values).ravel()
    if kind == "auto":
        kind = "numeric" if arr.dtype.kind in "iuf" else "categorical"
    if kind == "categorical":
        cats = sorted(set(arr.tolist()), key=str)
        if not cats:
            raise ValueError(f"feature `{name}` has no values")
        return FeatureProfile(name, "categorical", arr.size, category_counts(arr, cats)[:-1].tolist(), categories=cats)
    if kind != "numeric":
        raise ValueError(f"`kind` of feature `{name}` must be auto, numeric or categorical, got {kind!r}")
    arr = arr.astype(float)
    present = arr[~np.isnan(arr)]
    if present.size == 0:
        raise ValueError(f"feature `{name}` has no non-missing values; drop it or fill it")
    edges = quantile_edges(present, bins)
    qs = np.quantile(present, QUANTILES)
    return FeatureProfile(
        name,
        "numeric",
        int(present.size),
        bin_counts(present, edges).tolist(),
        edges=edges.tolist(),
        quantiles={str(q): float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        missing=int(arr.size - present.size),
    )


def feature_profiles(
    x: Any, names: Sequence[str] | None = None, bins: int = 10, sequence: bool = False
) -> dict[str, FeatureProfile]:
    """Profile every input feature. `x` is (n, F), or any (n, ...) flattened to (n, F) (e.g. pixels); with
    `sequence=True` it is (n, T, F) and each feature pools its values over all time steps."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ValueError(f"`x` must be (n, ...) with n >= 1, got shape {arr.shape}")
    if sequence:
        if arr.ndim != 3:
            raise ValueError(f"with sequence=True `x` must be (n, T, F), got shape {arr.shape}")
        arr = arr.reshape(-1, arr.shape[2])
    arr = arr.reshape(arr.shape[0], -1)
    names = list(names) if names is not None else [f"x{i}" for i in range(arr.shape[1])]
    if len(names) != arr.shape[1] or len(set(names)) != len(names):
        raise ValueError(
            f"`names` must be {arr.shape[1]} distinct names, got {len(names)} ({len(set(names))} distinct)"
        )
    return {n: feature_profile(arr[:, i], n, bins, "numeric") for i, n in enumerate(names)}


def reservoir_sample(rows: Any, size: int = 1000, seed: int = 0) -> np.ndarray:
    """A uniform sample of `size` rows without replacement (all rows if fewer), as float32 (n, d)."""
    arr = np.asarray(rows, dtype=np.float32)
    arr = arr.reshape(len(arr), -1)
    if len(arr) <= size:
        return arr.copy()
    return arr[np.sort(np.random.default_rng(seed).choice(len(arr), size, replace=False))]


def text_statistics(
    token_ids: Sequence[Sequence[int]] | np.ndarray, unk_id: int, pad_id: int | None = None, bins: int = 10
) -> dict[str, Any]:
    """Sequence lengths and unknown-token rates. `token_ids` is a list of id sequences, or a padded 2-D array with
    `pad_id` (padding is not counted). Returns the length and per-sequence unk-rate profiles and the pooled rate
    (unknown tokens over all tokens)."""
    seqs = [np.asarray(s) for s in token_ids]
    if not seqs:
        raise ValueError("`token_ids` is empty")
    if pad_id is not None:
        seqs = [s[s != pad_id] for s in seqs]
    lengths = np.array([s.size for s in seqs], dtype=float)
    unks = np.array([np.count_nonzero(s == unk_id) for s in seqs], dtype=float)
    rates = np.divide(unks, lengths, out=np.zeros_like(unks), where=lengths > 0)  # an empty text has no unknowns
    return {
        "length": feature_profile(lengths, TEXT_LENGTH, bins, "numeric"),
        "unk_rate": feature_profile(rates, TEXT_UNK_RATE, bins, "numeric"),
        "unk_token_rate": float(unks.sum() / lengths.sum()) if lengths.sum() else 0.0,
    }


def prediction_profile(probs: Any, classes: Sequence[Any] | None = None, bins: int = 10) -> dict[str, FeatureProfile]:
    """Predicted-class distribution (argmax; every class listed, even with count 0) and the confidence (max
    probability) histogram on its quantile bins, from (n, C) class probabilities."""
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"`probs` must be (n, C) with n >= 1, got shape {p.shape}")
    classes = list(classes) if classes is not None else list(range(p.shape[1]))
    if len(classes) != p.shape[1]:
        raise ValueError(f"`classes` has {len(classes)} entries but `probs` has {p.shape[1]} columns")
    predicted = np.asarray(classes, dtype=object)[p.argmax(1)]
    counts = category_counts(predicted, classes)[:-1].tolist()
    return {
        "class": FeatureProfile(PREDICTED_CLASS, "categorical", len(p), counts, categories=classes),
        "confidence": feature_profile(p.max(1), CONFIDENCE, bins, "numeric"),
    }


def group_rates(y_true: Any, y_pred: Any, groups: Any, positive: Any = 1) -> dict[str, dict[str, Any]]:
    """Per group: counts, selection rate, TPR, FPR and error rate (one-vs-rest for `positive`), keyed by
    str(group) for JSON; the original value is kept under "group"."""
    out = {}
    for g, c in group_counts(y_pred, groups, positive, y_true).items():
        rates = {"selection_rate": c.selection_rate, "tpr": c.tpr, "fpr": c.fpr, "error_rate": c.error_rate}
        out[str(g)] = {"group": g, **asdict(c), **rates}
    return out


@dataclass
class ReferenceProfile:
    """Everything the monitor compares live windows against; `samples` holds arrays (e.g. "embedding")."""

    features: dict[str, FeatureProfile] = field(default_factory=dict)
    predictions: dict[str, FeatureProfile] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def signals(self) -> dict[str, FeatureProfile]:
        """Every histogrammed signal by name: input features, prediction class and confidence, text statistics."""
        out = dict(self.features)
        out.update({p.name: p for p in self.predictions.values()})
        out.update({v.name: v for v in self.text.values() if isinstance(v, FeatureProfile)})
        return out

    def bins(self) -> Bins:
        """The window bins for live traffic: numeric signals in `signals()` order, then categorical ones."""
        sig = self.signals()
        return Bins(
            {k: v.edges for k, v in sig.items() if v.kind == "numeric"},
            {k: v.categories for k, v in sig.items() if v.kind == "categorical"},
        )


def build_reference(
    features: Any = None,
    feature_names: Sequence[str] | None = None,
    *,
    sequence: bool = False,
    embeddings: Any = None,
    probs: Any = None,
    classes: Sequence[Any] | None = None,
    token_ids: Any = None,
    unk_id: int | None = None,
    pad_id: int | None = None,
    y_true: Any = None,
    groups: Any = None,
    positive: Any = 1,
    bins: int = 10,
    sample_size: int = 1000,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
) -> ReferenceProfile:
    """One call for training's end: profile whatever arrays are given (all optional, all from the validation split).

    Group rates need `y_true`, `groups` and `probs` (predictions are the argmax class). A uniform sample of
    `sample_size` feature rows and embeddings is kept for KS and MMD tests.
    """
    ref = ReferenceProfile(meta=dict(meta or {}))
    if clash := RESERVED & set(feature_names or ()):
        raise ValueError(f"`feature_names` {sorted(clash)} are reserved for derived signals; rename them")
    if features is not None:
        ref.features = feature_profiles(features, feature_names, bins, sequence)
        rows = np.asarray(features, dtype=float)
        ref.samples["features"] = reservoir_sample(
            rows.reshape(-1, rows.shape[-1]) if sequence else rows, sample_size, seed
        )
    if embeddings is not None:
        ref.samples["embedding"] = reservoir_sample(embeddings, sample_size, seed)
    if token_ids is not None:
        if unk_id is None:
            raise ValueError("`unk_id` is required with `token_ids` (the tokenizer's unknown-token id)")
        ref.text = text_statistics(token_ids, unk_id, pad_id, bins)
    if probs is not None:
        ref.predictions = prediction_profile(probs, classes, bins)
        if groups is not None and y_true is not None:
            labels = list(classes) if classes is not None else list(range(np.shape(probs)[1]))
            y_pred = np.asarray(labels, dtype=object)[np.asarray(probs).argmax(1)]
            ref.groups = group_rates(np.asarray(y_true, dtype=object), y_pred, groups, positive)
    return ref


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (strict JSON); numpy scalars become Python ones."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_reference(ref: ReferenceProfile, directory: str | Path) -> Path:
    """Write reference.json and reference.npz into `directory` (created if needed); returns the JSON path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "version": FORMAT_VERSION,
        "features": {k: asdict(v) for k, v in ref.features.items()},
        "predictions": {k: asdict(v) for k, v in ref.predictions.items()},
        "text": {k: asdict(v) if isinstance(v, FeatureProfile) else v for k, v in ref.text.items()},
        "groups": ref.groups,
        "meta": ref.meta,
        "samples": sorted(ref.samples),
    }
    (out / "reference.json").write_text(json.dumps(_json_safe(doc), indent=1, allow_nan=False))
    np.savez(out / "reference.npz", **ref.samples)  # type: ignore[arg-type]  # numpy stubs miss **arrays
    return out / "reference.json"


def load_reference(directory: str | Path) -> ReferenceProfile:
    """Read what `save_reference` wrote; a missing file raises FileNotFoundError naming it."""
    path = Path(directory)
    doc_path = path / "reference.json"
    if not doc_path.exists():
        raise FileNotFoundError(f"no reference profile at {doc_path}: was the model trained with steward?")
    doc = json.loads(doc_path.read_text())
    if doc.get("version") != FORMAT_VERSION:
        raise StewardError(
            f"{doc_path} has format version {doc.get('version')!r}; this steward reads {FORMAT_VERSION}: "
            "retrain the run with this steward"
        )
    with np.load(path / "reference.npz", allow_pickle=False) as npz:
        samples = {k: npz[k] for k in doc["samples"]}
    rates = ("selection_rate", "tpr", "fpr", "error_rate")  # NaN, written as null
    nan = lambda d: {k: (math.nan if v is None and k in rates else v) for k, v in d.items()}  # noqa: E731
    return ReferenceProfile(
        features={k: FeatureProfile(**v) for k, v in doc["features"].items()},
        predictions={k: FeatureProfile(**v) for k, v in doc["predictions"].items()},
        text={k: FeatureProfile(**v) if isinstance(v, dict) else v for k, v in doc["text"].items()},
        groups={k: nan(v) for k, v in doc["groups"].items()},
        meta=doc["meta"],
        samples=samples,
    )


def reference_dir(run_dir: str | Path, int8: bool = False) -> Path | None:
    """Where the reference a deployment of the run is judged against lives: serving int8, the int8 model's own profile
    (model/int8/, saved with the int8 gate), else training's (model/); None when training saved none."""
    model_dir = Path(run_dir) / "model"
    for folder in ([model_dir / INT8_REFERENCE] if int8 else []) + [model_dir]:
        if (folder / "reference.json").exists():
            return folder
    return None


def reference_for(run_dir: str | Path, int8: bool = False) -> ReferenceProfile | None:
    """The reference profile at `reference_dir`, or None when training saved none."""
    folder = reference_dir(run_dir, int8)
    return load_reference(folder) if folder else None
