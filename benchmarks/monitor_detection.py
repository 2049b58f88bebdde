"""How good is the monitor? Seeded shifts of known size through the live monitor's own code, window by window.

    python benchmarks/monitor_detection.py [--seeds 0 1 2] [--clean-windows 5000] [--trials 50] [--max-windows 8]

Two deployments, each trained once per seed (`tests.serving.trained_run`: plain torch, the reference saved beside
the model as training saves it; the seed also draws the splits):

- digits: the quickstart CNN with quickstart's monitor section (drift only: PSI of the predicted class and the
  confidence, MMD of the embeddings). Shifts of the held-out images: Gaussian pixel noise, rotation, and a class-prior
  shift (classes 0-4 drawn `w` times as often as 5-9).
- text: fair-text.yaml without its injected bias (`data.options.bias=0`), monitored for drift (PSI of predicted
  class, confidence, text length and unknown-token rate, MMD of the embeddings) and bias (`group`, favourable "1",
  privileged "a": statistical parity, disparate impact, and from late labels equalized odds and equal opportunity).
  Shifts: vocabulary (each word replaced, with the given probability, by a word the training text never had), and
  labels flipped in group "b" (the given share of its late labels), which moves no input or output at all.

Records are drawn with replacement (seeded) from the test split, which the reference (the validation split) never
saw. The model's outputs go through the serving path (`ServedModel.run(embed=True)`, `RecordQueue.count_into`) into a
`WindowState` of the live kind (`checks.LIVE_SAMPLES`); every record's late label arrives within its window
(`add_feedback`). Each closed window is judged by `checks.window_report` and fed to an `AlertTracker`, all with the
spec's defaults: windows of 500 records, consecutive_windows 2, PSI 0.2, MMD p 0.01 with 100 permutations.

- False alarms: one stream of `--clean-windows` clean windows per deployment and seed: per check, the share of
  windows that fail and the alerts per 100 windows; per deployment, alerts of any check per 100 windows.
- Detection: `--trials` fresh streams of shifted windows per shift and seed: per check, the window that first fails
  and the window whose alert opens (1-based; with consecutive_windows 2 the earliest alert is window 2, so "detected
  within 2 windows" means the check failed in both of the first two shifted windows).
- Shift size: PSI against the reference of each judged histogram of a 20,000-record draw (clean: the same draw from
  the unshifted pool, the floor a finite test split and reference put under every figure).

Writes benchmarks/results/monitor_detection.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.serving: the fast trained-run helper the serve tests use

from tests.serving import trained_run  # noqa: E402

from steward.bench.machine import manifest  # noqa: E402
from steward.data.prepare import _tables  # noqa: E402
from steward.monitor.checks import LIVE_SAMPLES, AlertTracker, drift_checks, window_report  # noqa: E402
from steward.monitor.reference import reference_for  # noqa: E402
from steward.monitor.window_state import WindowState  # noqa: E402
from steward.serve.model import Output, load_served_model  # noqa: E402
from steward.serve.monitoring import RecordQueue  # noqa: E402
from steward.spec import load_job  # noqa: E402
from steward.spec.monitor import SIGNED, MonitorSpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "monitor_detection.json"
EOD = "equalized_odds_difference"
BIAS_METRICS = [*SIGNED, EOD, "equal_opportunity_difference"]  # from the predictions, and from the late labels
TEXT_MONITOR = {"drift": {}, "bias": {"group": "group", "favourable": "1", "privileged": "a", "metrics": BIAS_METRICS}}
# Words the synthetic text's generator never writes (steward.data.synthetic.WORDS): a vocabulary the model never saw.
NEW_WORDS = (
    "zephyr quorble snazzy vibe glitch yeet doomscroll rizz bussin mid sus stan drip salty cringe".split()  # noqa: SIM905
)
SHIFTS = {
    "digits": [("noise", s) for s in (0.05, 0.1, 0.25, 1.0)]
    + [("rotation", d) for d in (0.5, 2.0, 5.0, 15.0)]
    + [("prior", w) for w in (1.5, 2.0, 3.0, 6.0)],
    "text": [("vocabulary", r) for r in (0.02, 0.05, 0.1, 0.25)] + [("label_flip_b", f) for f in (0.05, 0.1, 0.2, 0.4)],
}
SIZE_DRAW = 20_000
PSI_TARGET = 0.25


@dataclass
class Pool:
    """Held-out records as the served model answered them, with their groups, labels and draw weights."""

    output: Output
    groups: np.ndarray | None
    labels: np.ndarray
    weights: np.ndarray | None = None

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        p = None if self.weights is None else self.weights / self.weights.sum()
        return rng.choice(len(self.labels), n, replace=True, p=p)


@dataclass
class Deployment:
    name: str
    served: Any
    ref: Any
    cfg: MonitorSpec
    rows: list  # raw test inputs, as a client sends them
    clean: Pool

    def answer(self, rows: list, groups: np.ndarray | None, labels: np.ndarray) -> Pool:
        (output,) = self.served.run([self.served.prepare(rows)], embed=True)
        return Pool(output, groups, labels)


def deploy(name: str, seed: int, tmp: Path) -> Deployment:
    """Train the deployment's model for `seed` and answer its test split."""
    if name == "digits":
        spec, run_dir = trained_run(tmp / name, "quickstart.yaml", f"seed={seed}")
        cfg = spec.monitor
    else:
        spec, run_dir = trained_run(tmp / name, "fair-text.yaml", f"seed={seed}", "data.options.bias=0")
        cfg = MonitorSpec.model_validate(TEXT_MONITOR)
    served = load_served_model(spec.model_copy(update={"serve": None}), run_dir)
    columns, tables = _tables(spec, roles=["test"])
    test = tables["test"]
    rows = [r.tolist() if hasattr(r, "tolist") else r for r in test[columns.input]]
    groups = np.asarray(test[columns.groups[0]], dtype=object) if columns.groups else None
    labels = np.asarray(served.info.label_names, dtype=object)[np.asarray(test[columns.label], dtype=int)]
    (output,) = served.run([served.prepare(rows)], embed=True)
    return Deployment(name, served, reference_for(run_dir), cfg, rows, Pool(output, groups, labels))


def shifted(dep: Deployment, kind: str, size: float, rng: np.random.Generator) -> Pool:
    """The test split under one shift: transformed inputs answered again, reweighted draws, or flipped labels."""
    pool = dep.clean
    if kind == "noise":
        rows = [np.clip(np.asarray(r) + rng.normal(0, size, np.shape(r)), 0, 16).tolist() for r in dep.rows]
        return dep.answer(rows, pool.groups, pool.labels)
    if kind == "rotation":
        angles = rng.choice([-size, size], len(dep.rows))
        rows = [_rotate(np.asarray(r, dtype=float), a) for r, a in zip(dep.rows, angles, strict=True)]
        return dep.answer(rows, pool.groups, pool.labels)
    if kind == "prior":
        weights = np.where(np.isin(pool.labels, dep.served.info.label_names[:5]), size, 1.0)
        return replace(pool, weights=weights)
    if kind == "vocabulary":
        rows = [" ".join(rng.choice(NEW_WORDS) if rng.random() < size else w for w in t.split()) for t in dep.rows]
        return dep.answer(rows, pool.groups, pool.labels)
    if kind == "label_flip_b":
        flip = (pool.groups == "b") & (rng.random(len(pool.labels)) < size)
        names = dep.served.info.label_names
        labels = np.where(flip, np.where(pool.labels == names[1], names[0], names[1]), pool.labels)
        return replace(pool, labels=labels)
    raise ValueError(kind)


def _rotate(image: np.ndarray, degrees: float) -> list:
    """An 8x8 digit turned about its centre, as a scanner that sits askew would give it."""
    flat = image.ndim == 1
    square = image.reshape(8, 8) if flat else image
    turned = np.clip(ndimage.rotate(square, degrees, reshape=False, order=1, mode="constant"), 0, 16)
    return (turned.ravel() if flat else turned).tolist()


def window(dep: Deployment, pool: Pool, idx: np.ndarray, seed: int) -> WindowState:
    """Count the drawn records into a live window state as a replica's push does, then their late labels."""
    out = pool.output
    part = Output(
        out.probabilities[idx],
        None if out.embeddings is None else out.embeddings[idx],
        None if out.inputs is None else out.inputs[idx],
        None if out.attention_mask is None else out.attention_mask[idx],
    )
    queue = RecordQueue(dep.served, dep.ref.bins(), dep.cfg.bias)
    ids = [f"{seed}-{i}" for i in range(len(idx))]
    attributes = {"group": pool.groups[idx].tolist()} if pool.groups is not None else {}
    queue.append(part, attributes, ids)
    state = WindowState(dep.ref.bins(), samples=LIVE_SAMPLES, seed=seed)
    queue.count_into(state)
    if dep.cfg.bias is not None:
        for rid, label in zip(ids, pool.labels[idx], strict=True):
            state.add_feedback(rid, label)
    return state


def stream(dep: Deployment, pool: Pool, windows: int, seed: int) -> list[dict]:
    """Judge `windows` windows of `pool` in a row with one AlertTracker: per window, each check's status and the
    checks whose alert opened."""
    rng = np.random.default_rng([seed, 7])
    tracker = AlertTracker(dep.cfg.alerts.consecutive_windows)
    size = int(dep.cfg.window.size)
    out = []
    for w in range(windows):
        report = window_report(window(dep, pool, pool.draw(rng, size), seed * 100_000 + w), dep.ref, dep.cfg, w)
        events = tracker.update(report)
        out.append(
            {
                "status": {c["name"]: c["status"] for c in report["checks"]},
                "alerts": [e["name"] for e in events if e["event"] == "alert"],
            }
        )
    return out


def false_alarms(dep: Deployment, windows: int, seed: int) -> dict:
    """Per check: failing windows and opened alerts per 100 clean windows; per deployment: alerts of any check."""
    judged = stream(dep, dep.clean, windows, seed)
    names = sorted({n for w in judged for n in w["status"]})
    per_check = {
        n: {
            "fail_per_100": 100 * sum(w["status"].get(n) == "fail" for w in judged) / windows,
            "alerts_per_100": 100 * sum(n in w["alerts"] for w in judged) / windows,
        }
        for n in names
    }
    return {
        "windows": windows,
        "checks": per_check,
        "alerts_per_100": 100 * sum(len(w["alerts"]) for w in judged) / windows,
        "alerting_windows_per_100": 100 * sum(bool(w["alerts"]) for w in judged) / windows,
    }


def detection(dep: Deployment, pool: Pool, trials: int, max_windows: int, seed: int) -> dict:
    """Per check (and "any"): over `trials` fresh streams of shifted windows, the first failing window and the window
    the alert opens (None: not within max_windows)."""
    first_fail: dict[str, list] = {}
    first_alert: dict[str, list] = {}
    for t in range(trials):
        judged = stream(dep, pool, max_windows, seed * 1000 + t + 1)
        names = sorted({n for w in judged for n in w["status"]}) + ["any"]
        for n in names:
            fails = [i + 1 for i, w in enumerate(judged) if _fails(w, n)]
            alerts = [i + 1 for i, w in enumerate(judged) if (w["alerts"] if n == "any" else n in w["alerts"])]
            first_fail.setdefault(n, []).append(fails[0] if fails else None)
            first_alert.setdefault(n, []).append(alerts[0] if alerts else None)
    return {
        n: {
            "first_fail": tally(first_fail[n]),
            "first_alert": tally(first_alert[n]),
            "alert_within_2": sum(a is not None and a <= 2 for a in first_alert[n]) / trials,
        }
        for n in first_fail
    }


def tally(windows: list[int | None]) -> dict[str, int]:
    """Trials by the window they first did it in ("none": not within max_windows)."""
    counts = Counter(windows)
    return {("none" if w is None else str(w)): counts[w] for w in sorted(counts, key=lambda w: w or 1_000_000)}


def _fails(judged: dict, name: str) -> bool:
    status = judged["status"]
    return "fail" in status.values() if name == "any" else status.get(name) == "fail"


def shift_size(dep: Deployment, pool: Pool, seed: int) -> dict[str, float | None]:
    """PSI of each judged histogram of a large draw from `pool` against the reference (the shift's own size)."""
    state = window(dep, pool, pool.draw(np.random.default_rng([seed, 11]), SIZE_DRAW), seed)
    drift = dep.cfg.drift.model_copy(update={"signals": [s for s in dep.cfg.drift.signals if s != "embeddings"]})
    sizes: dict[str, float | None] = {c.name: c.value for c in drift_checks(state, dep.ref, drift)}
    if dep.cfg.bias is not None:  # the label-based metrics' population values, for the label shift
        report = window_report(state, None, dep.cfg.model_copy(update={"drift": None}))
        sizes.update({c["name"]: c["value"] for c in report["checks"]})
    return sizes


def run_seed(name: str, seed: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Train, then the clean stream, then every shift, for one deployment and seed."""
    started = time.perf_counter()
    dep = deploy(name, seed, tmp)
    trained = time.perf_counter()
    out: dict[str, Any] = {"clean_size": shift_size(dep, dep.clean, seed)}
    out["false_alarms"] = false_alarms(dep, args.clean_windows, seed)
    clean_s = time.perf_counter() - trained
    out["shifts"] = {}
    for kind, size in SHIFTS[name]:
        pool = shifted(dep, kind, size, np.random.default_rng([seed, 5]))
        out["shifts"][f"{kind}={size:g}"] = {
            "size": shift_size(dep, pool, seed),
            "detection": detection(dep, pool, args.trials, args.max_windows, seed),
        }
    out["seconds"] = {"train": trained - started, "clean": clean_s, "total": time.perf_counter() - started}
    out["test_records"] = len(dep.clean.labels)
    Console().print(f"{name} seed {seed}: {out['seconds']}")
    return out


def spread(values: list[float | None]) -> str:
    """Median over seeds with min-max; "-" where a value is missing."""
    xs = [v for v in values if v is not None]
    if not xs:
        return "-"
    fmt = (lambda v: f"{v:.3g}") if max(abs(x) for x in xs) < 100 else (lambda v: f"{v:.0f}")
    if len(xs) == 1:
        return fmt(xs[0])
    return f"{fmt(statistics.median(xs))} [{fmt(min(xs))}-{fmt(max(xs))}]"


def median_window(tallied: dict[str, int]) -> float | None:
    """The median trial's window (`tally`), a miss counting as later than any window; None when most trials miss."""
    ranked = [None if w == "none" else int(w) for w, n in tallied.items() for _ in range(n)]
    middle = ranked[(len(ranked) - 1) // 2]
    return None if middle is None else float(middle)


def false_alarm_table(results: dict) -> Table:
    table = Table(title="Clean traffic: failing windows and alerts per 100 windows (median over seeds [min-max])")
    for col in ("deployment", "check", "clean PSI", "fails / 100", "alerts / 100"):
        table.add_column(col, justify="left" if col in ("deployment", "check") else "right")
    for name, seeds in results.items():
        runs = list(seeds.values())
        checks = sorted({c for r in runs for c in r["false_alarms"]["checks"]})
        for c in checks:
            rows = [r["false_alarms"]["checks"].get(c, {}) for r in runs]
            psi = [r["clean_size"].get(c) for r in runs] if c.startswith("psi:") else [None]
            table.add_row(
                name, c, spread(psi), spread([x.get("fail_per_100") for x in rows]),
                spread([x.get("alerts_per_100") for x in rows]),
            )  # fmt: skip
        fa = [r["false_alarms"] for r in runs]
        windows = spread([x["alerting_windows_per_100"] for x in fa])
        alerts = spread([x["alerts_per_100"] for x in fa])
        table.add_row(name, "[bold]deployment (any check)", "", f"alerting windows {windows}", alerts)
    return table


def shift_label(shift: str, per_seed: list[dict]) -> str:
    """The shift's size: its largest PSI on a judged histogram, or for flipped labels the equalized odds gap."""
    if shift.startswith("label_flip"):
        return f"{spread([p['size'].get(EOD) for p in per_seed])} (EOD)"
    psis = {k: [p["size"].get(k) for p in per_seed] for k in per_seed[0]["size"] if k.startswith("psi:")}
    top = max(psis, key=lambda k: statistics.median(v or 0 for v in psis[k]))
    return f"{spread(psis[top])} ({top.removeprefix('psi:')})"


def detection_table(results: dict) -> Table:
    title = "Shifted traffic: window of the first fail / of the alert (median trial; median over seeds [min-max])"
    table = Table(title=title + "; checks that never fail are left out")
    for col in ("deployment", "shift", "size", "check", "1st fail", "alert", "alert <= 2"):
        table.add_column(col, justify="left" if col in ("deployment", "shift", "check") else "right")
    for name, seeds in results.items():
        runs = list(seeds.values())
        for shift in runs[0]["shifts"]:
            per_seed = [r["shifts"][shift] for r in runs]
            label = shift_label(shift, per_seed)
            failed = [c for c in per_seed[0]["detection"] if any(_ever_failed(p["detection"][c]) for p in per_seed)]
            for i, check in enumerate(failed or ["any"]):
                det = [p["detection"][check] for p in per_seed]
                table.add_row(
                    name if i == 0 else "", shift if i == 0 else "", label if i == 0 else "", check,
                    spread([median_window(d["first_fail"]) for d in det]),
                    spread([median_window(d["first_alert"]) for d in det]),
                    spread([100 * d["alert_within_2"] for d in det]) + "%",
                )  # fmt: skip
            table.add_section()
    return table


def _ever_failed(detected: dict) -> bool:
    return bool(detected["first_fail"].keys() - {"none"})


def targets(results: dict) -> dict:
    """The issue's targets: every shift with PSI >= 0.25 on a judged signal alerted by window 2 (share of trials, all
    seeds), and at most 1 alert per 100 clean windows per deployment (each seed)."""
    out: dict[str, Any] = {}
    for name, seeds in results.items():
        runs = list(seeds.values())
        fa = [r["false_alarms"]["alerts_per_100"] for r in runs]
        big = {}
        for shift in runs[0]["shifts"]:
            per_seed = [r["shifts"][shift] for r in runs]
            psi = [max((v or 0) for k, v in p["size"].items() if k.startswith("psi:")) for p in per_seed]
            if min(psi) >= PSI_TARGET:
                big[shift] = min(p["detection"]["any"]["alert_within_2"] for p in per_seed)
        out[name] = {
            "false_alerts_per_100_max_over_seeds": max(fa),
            "false_alarm_target_met": max(fa) <= 1.0,
            "shifts_psi_ge_0.25_alert_within_2_min_share": big,
            "detection_target_met": all(v == 1.0 for v in big.values()),
        }
    return out


def plot(results: dict, path: Path) -> None:
    """Left: share of trials alerted by window 2 against the shift's largest PSI, a point per seed (flipped labels
    move no histogram and are left out). Right: alerts per 100 clean windows per check and per deployment."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=[1, 1.3])
    for name, seeds in results.items():
        kinds: dict[str, list[tuple[float, float]]] = {}
        for run in seeds.values():
            for shift, res in run["shifts"].items():
                if not shift.startswith("label_flip"):
                    psi = max((v or 0) for k, v in res["size"].items() if k.startswith("psi:"))
                    kinds.setdefault(shift.split("=")[0], []).append((psi, res["detection"]["any"]["alert_within_2"]))
        for kind, points in kinds.items():
            left.scatter(*zip(*points, strict=True), label=f"{name}: {kind}", alpha=0.7)
    left.axvline(PSI_TARGET, color="grey", ls="--")
    left.set(xscale="log", xlabel="largest PSI of the shift on a judged histogram", ylabel="trials alerted by window 2")
    left.legend(fontsize=8)
    labels, medians, errors = [], [], []
    for name, seeds in results.items():
        runs = [r["false_alarms"] for r in seeds.values()]
        rows = {c: [r["checks"][c]["alerts_per_100"] for r in runs] for c in runs[0]["checks"]}
        rows["deployment (any)"] = [r["alerts_per_100"] for r in runs]
        for check, values in rows.items():
            labels.append(f"{name}: {check}")
            medians.append(statistics.median(values))
            errors.append((medians[-1] - min(values), max(values) - medians[-1]))
    right.barh(labels, medians, xerr=np.array(errors).T, color="tab:blue")
    right.axvline(1.0, color="grey", ls="--")
    right.set(xlabel="alerts per 100 clean windows (median over seeds, min-max)")
    right.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clean-windows", type=int, default=5000)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--max-windows", type=int, default=8)
    parser.add_argument("--deployments", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.deployments:
            results[name] = {str(s): run_seed(name, s, args, Path(tmp) / str(s)) for s in args.seeds}
    doc = {
        "benchmark": "monitor_detection",
        "settings": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "size_draw": SIZE_DRAW,
        },
        "monitor": {"digits": "quickstart.yaml's monitor section", "text": TEXT_MONITOR},
        "targets": targets(results),
        "results": results,
        "seconds": time.perf_counter() - started,
        "machine": manifest(load_job(ROOT / "jobs" / "quickstart.yaml")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    plot(results, args.out.with_suffix(".png"))
    console = Console(width=160)
    console.print(false_alarm_table(results))
    console.print(detection_table(results))
    console.print_json(data=doc["targets"])
    console.print(f"{doc['machine']['cpu']}, {doc['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
