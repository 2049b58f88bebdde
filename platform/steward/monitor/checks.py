"""Judge one closed window against the reference and the spec's thresholds; turn failing streaks into alerts.

Pure: a `WindowState`, a `ReferenceProfile` and the `monitor` spec section in, plain `Check` rows out.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from steward.monitor import bias
from steward.monitor.bins import Bins
from steward.monitor.drift import chi2_test, correct_pvalues, ks_test, mmd_test, psi
from steward.monitor.performance import window_performance
from steward.monitor.reference import (
    CONFIDENCE,
    PREDICTED_CLASS,
    TEXT_LENGTH,
    TEXT_UNK_RATE,
    FeatureProfile,
    ReferenceProfile,
)
from steward.monitor.reservoir import SampleSpec
from steward.monitor.window_state import WindowState
from steward.spec.monitor import BiasSpec, DriftSpec, LeakSpec, MonitorSpec, PerformanceSpec

# Points per side of the MMD test: about the size of a reference sample (the validation split), beyond which live
# points add little power and each test costs more (its kernel matrix grows with the square of the points).
MMD_POINTS = 200
# What live windows keep of each sample: as many embeddings as the MMD test judges, in float16 (MMD computes in float64;
# the rounding, 5e-4 relative, is far below the kernel's bandwidth). Half the bytes keep a replica's push small enough
# for Ray to send it inline with the call (under 100 KB) rather than through the object store, which costs more CPU.
LIVE_SAMPLES = {"embedding": SampleSpec(MMD_POINTS, "float16")}
BIAS_FUNCTIONS = {
    "statistical_parity_difference": bias.statistical_parity_difference_from_counts,
    "disparate_impact_ratio": bias.disparate_impact_ratio_from_counts,
    "demographic_parity_difference": bias.demographic_parity_difference_from_counts,
    "demographic_parity_ratio": bias.demographic_parity_ratio_from_counts,
    "equalized_odds_difference": bias.equalized_odds_difference_from_counts,
    "equal_opportunity_difference": bias.equal_opportunity_difference_from_counts,
}
LABEL_METRICS = ("equalized_odds_difference", "equal_opportunity_difference")  # judged on late labels


@dataclass
class Check:
    """One metric of one window: its value, the allowed [low, high], and ok | fail | insufficient."""

    # e.g. "psi:prediction.class", "chi2:prediction.class", "ks:feature_3", "mmd:embedding",
    # "statistical_parity_difference", "accuracy", "f1_macro:<group>"
    name: str
    kind: str  # drift | bias | performance | input | leak
    value: float | None
    low: float
    high: float
    status: str

    @classmethod
    def judge(cls, name: str, kind: str, value: float | None, low: float, high: float) -> Check:
        if value is None or not math.isfinite(value):
            return cls(name, kind, None, low, high, "insufficient")
        return cls(name, kind, float(value), low, high, "ok" if low <= value <= high else "fail")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_state(bins: Bins) -> WindowState:
    """An empty window state as replicas and the monitor keep live traffic (`LIVE_SAMPLES`)."""
    return WindowState(bins, samples=LIVE_SAMPLES)


def drift_signals(cfg: DriftSpec, ref: ReferenceProfile) -> list[str]:
    """The histogrammed signals the spec asks to watch that this reference has."""
    wanted = {
        "features": list(ref.features),
        "predictions": [PREDICTED_CLASS],
        "confidence": [CONFIDENCE],
        "text": [TEXT_LENGTH, TEXT_UNK_RATE],
    }
    names = [name for signal in cfg.signals for name in wanted.get(signal, [])]
    return [name for name in names if name in ref.signals()]


def drift_checks(window: WindowState, ref: ReferenceProfile, cfg: DriftSpec, seed: int = 0) -> list[Check]:
    """PSI per histogrammed signal, chi-square per categorical one and KS per input feature (each family corrected),
    MMD on the embeddings."""
    if window.n < cfg.min_records:
        return []
    names = drift_signals(cfg, ref)
    checks = [_psi_check(window, ref.signals()[name], cfg) for name in names]
    checks += chi2_checks(window, ref, cfg, names)
    live = window.reservoirs.get("features")
    if "features" in cfg.signals and live is not None and "features" in ref.samples:
        sample = live.sample
        pvalues = [ks_test(ref.samples["features"][:, i], sample[:, i])[1] for i in range(sample.shape[1])]
        for name, p in zip(ref.features, correct_pvalues(pvalues, cfg.correction), strict=True):
            checks.append(Check.judge(f"ks:{name}", "drift", float(p), cfg.ks_pvalue, 1.0))
    live = window.reservoirs.get("embedding")
    if "embeddings" in cfg.signals and live is not None and "embedding" in ref.samples and len(live.sample) > 1:
        rng = np.random.default_rng(seed)
        # the reference rounded as live samples are kept (float16): else a model whose embeddings spread less than
        # that rounding would look drifted by the rounding alone
        x = _subsample(ref.samples["embedding"], MMD_POINTS, rng).astype(live.sample.dtype)
        y = _subsample(live.sample, MMD_POINTS, rng)
        p = mmd_test(x, y, cfg.mmd_permutations, rng)[1]
        checks.append(Check.judge("mmd:embedding", "drift", p, cfg.mmd_pvalue, 1.0))
    return checks


def _reference_cells(profile: FeatureProfile) -> np.ndarray:
    """The reference's counts on a live histogram's cells: a categorical one has a last cell for unseen values."""
    return np.append(profile.counts, 0) if profile.kind == "categorical" else np.asarray(profile.counts)


def _psi_check(window: WindowState, profile: FeatureProfile, cfg: DriftSpec) -> Check:
    reference = _reference_cells(profile)
    current = window.histogram(profile.name)[: len(reference)]
    value = psi(reference, current, kind="counts") if current.sum() else None
    return Check.judge(f"psi:{profile.name}", "drift", value, 0.0, cfg.psi_threshold)


def chi2_checks(
    window: WindowState, ref: ReferenceProfile, cfg: DriftSpec, names: list[str] | None = None
) -> list[Check]:
    """A chi-square test of each watched categorical signal (predicted classes, finish reasons, categorical inputs)
    against the reference's counts, unseen categories in a cell of their own; the p-values are corrected over these
    signals as the KS ones are over features. A signal with fewer than `min_records` live values in the window (an
    input most records lack) is insufficient: the test's approximation needs counts."""
    signals = ref.signals()
    watched = names if names is not None else drift_signals(cfg, ref)
    categorical = [name for name in watched if signals[name].kind == "categorical"]
    tested, pvalues = [], []
    for name in categorical:
        current = window.histogram(name)
        if current.sum() >= cfg.min_records:
            tested.append(name)
            pvalues.append(chi2_test(_reference_cells(signals[name]), current)[1])
    corrected = dict(zip(tested, correct_pvalues(pvalues, cfg.correction) if pvalues else [], strict=True))
    return [Check.judge(f"chi2:{name}", "drift", corrected.get(name), cfg.chi2_pvalue, 1.0) for name in categorical]


def _subsample(rows: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    return rows if len(rows) <= size else rows[rng.choice(len(rows), size, replace=False)]


def bias_checks(window: WindowState, cfg: BiasSpec) -> list[Check]:
    """Each configured group-fairness metric over the groups with enough records in this window: predictions for
    the rate metrics, late labels for the label-based ones (equalized odds, equal opportunity)."""
    counts = {g: c for g, c in window.group_counts(cfg.favourable).items() if g is not None}
    checks = []
    for metric in cfg.metrics:
        low, high = cfg.bounds(metric)
        labelled = metric in LABEL_METRICS
        judged = {g: c for g, c in counts.items() if (c.labelled if labelled else c.n) >= cfg.min_records_per_group}
        value = None
        enough = len(judged) >= 2 and (cfg.privileged is None or cfg.privileged in judged)
        if enough:
            fn = BIAS_FUNCTIONS[metric]
            signed = metric in ("statistical_parity_difference", "disparate_impact_ratio")
            value = fn(judged, cfg.privileged) if signed else fn(judged)  # type: ignore[operator]
        checks.append(Check.judge(metric, "bias", value, low, high))
    return checks


def performance_checks(performance: dict[str, Any], cfg: PerformanceSpec) -> list[Check]:
    """Each metric the spec sets a minimum for, over all the window's labels ("accuracy") and in each group
    ("accuracy:<group>"); insufficient with fewer than `min_labels` labels there. `performance` is
    `window_performance`'s."""
    sets = [("", performance["overall"]), *((f":{g}", got) for g, got in performance["groups"].items())]
    checks = []
    for suffix, got in sets:
        for metric, floor in cfg.minimums().items():
            value = got[metric] if got["labelled"] >= cfg.min_labels else None
            checks.append(Check.judge(metric + suffix, "performance", value, floor, 1.0))
    return checks


PII_TOTAL = "pii."  # window totals "pii.<entity type>": values of that type found in generated text
NGRAMS_JUDGED, NGRAMS_FOUND = "ngrams.judged", "ngrams.found"  # generated n-grams judged, and found in training text


def leak_checks(window: WindowState, cfg: LeakSpec) -> list[Check]:
    """Personal data per type in the window's generated text, and the share of its n-grams found verbatim in the
    training text. Replicas total every scanned type (zeros too), so a type that stops leaking recovers."""
    checks = [
        Check.judge(f"pii:{name.removeprefix(PII_TOTAL)}", "leak", count, 0, cfg.max_pii)
        for name, count in sorted(window.totals.items())
        if name.startswith(PII_TOTAL)
    ]
    judged = window.totals.get(NGRAMS_JUDGED, 0)
    share = window.totals.get(NGRAMS_FOUND, 0) / judged if judged else None
    if NGRAMS_JUDGED in window.totals:
        checks.append(Check.judge("regurgitation", "leak", share, 0.0, cfg.max_regurgitation))
    return checks


def invalid_check(window: WindowState, cfg: MonitorSpec) -> Check:
    """The share of the window's records refused as invalid: traffic built to overflow the model is a signal too."""
    rate = window.invalid / (window.n + window.invalid)
    return Check.judge("invalid_rate", "input", rate, 0.0, cfg.max_invalid_rate)


def window_report(window: WindowState, ref: ReferenceProfile | None, cfg: MonitorSpec, seed: int = 0) -> dict:
    """Everything judged about one window, JSON-ready: its span, checks, per-group selection rates, and accuracy,
    recall and F1 from the labels that arrived in it (`performance.window_performance`)."""
    checks = []
    performance = window_performance(window)
    if cfg.drift is not None and ref is not None:
        checks += drift_checks(window, ref, cfg.drift, seed)
    if cfg.bias is not None:
        checks += bias_checks(window, cfg.bias)
    if cfg.performance is not None:
        checks += performance_checks(performance, cfg.performance)
    if cfg.leaks is not None and window.n:
        checks += leak_checks(window, cfg.leaks)
    if window.invalid:
        checks.append(invalid_check(window, cfg))
    favourable = cfg.bias.favourable if cfg.bias else None
    counts = {str(g): c for g, c in window.group_counts(favourable).items() if g is not None}
    rates = {g: c.selection_rate for g, c in counts.items()}
    return {
        "records": window.n,
        "invalid_records": window.invalid,
        "start": window.start,
        "end": window.end,
        "checks": [c.to_dict() for c in checks],
        "selection_rates": {g: (r if math.isfinite(r) else None) for g, r in rates.items()},
        "group_records": {g: c.n for g, c in counts.items()},  # what each rate is out of
        "performance": performance,
    }


class AlertTracker:
    """A metric alerts after failing `consecutive` windows in a row and recovers at its first passing window."""

    def __init__(self, consecutive: int) -> None:
        self.consecutive = consecutive
        self.streaks: dict[str, int] = {}
        self.open: dict[str, dict[str, Any]] = {}

    def update(self, report: dict) -> list[dict[str, Any]]:
        """Feed one window report; returns the alert and recovery events it caused."""
        events = []
        for check in report["checks"]:
            name, status = check["name"], check["status"]
            if status == "insufficient":
                continue  # too few records says nothing either way: keep the streak as it is
            self.streaks[name] = self.streaks.get(name, 0) + 1 if status == "fail" else 0
            if status == "fail" and self.streaks[name] >= self.consecutive and name not in self.open:
                self.open[name] = _event("alert", check, self.streaks[name])
                events.append(self.open[name])
            elif status == "ok" and name in self.open:
                del self.open[name]
                events.append(_event("recovered", check, 0))
        return events

    def to_dict(self) -> dict[str, Any]:
        return {"streaks": self.streaks, "open": self.open}

    def restore(self, data: dict[str, Any]) -> None:
        self.streaks, self.open = dict(data["streaks"]), dict(data["open"])


def _event(kind: str, check: dict[str, Any], windows: int) -> dict[str, Any]:
    return {"event": kind, "time": time.time(), "windows": windows, **check}
