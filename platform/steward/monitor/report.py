"""`steward monitor report`: one HTML page with PNG plots, from what a deployment's monitor persisted.

Drift statistics over time against their thresholds, per-group favourable rates over time, accuracy, recall and F1
over time from late labels (all groups and each), and reference-versus-live histograms of the most drifted signals in
the latest window.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from steward.errors import StewardError  # noqa: E402
from steward.monitor.performance import METRICS  # noqa: E402
from steward.monitor.reference import ReferenceProfile, load_reference  # noqa: E402
from steward.monitor.window_state import WindowState  # noqa: E402
from steward.monitor.windowing import Windows  # noqa: E402


def find_monitor(target: Path, runs: Path) -> Path:
    """A monitor folder from a monitor folder, a run folder (its newest deployment) or a deployment name."""
    if (target / "state.json").exists():
        return target
    candidates = list(target.glob("monitor/*/state.json")) if target.is_dir() else []
    candidates = candidates or list(runs.glob(f"*/*/monitor/{target.name}/state.json"))
    if not candidates:
        raise StewardError(
            f"{target}: no monitor state here (a run folder, run/monitor/<deployment>, or a deployment name with "
            f"runs under {runs}); deploy with a monitor section and send traffic first"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime).parent


def plain(text: str) -> str:
    """A client's value as plot text: matplotlib reads `$...$` as maths (and raises on `$$`)."""
    return text.replace("$", r"\$")


def series(history: list[dict], kind: str) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for window in history:
        for check in window["checks"]:
            if check["kind"] == kind and check["value"] is not None:
                out.setdefault(check["name"], []).append((window["end"], check["value"]))
    return out


def plot_drift(history: list[dict], path: Path) -> None:
    """PSI (left) and p-values (right, log scale) per window, each with its threshold."""
    found = series(history, "drift")
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    start = min((w["end"] for w in history if w["end"]), default=0)
    thresholds = {c["name"]: c for w in history for c in w["checks"]}
    for name, points in found.items():
        axis = left if name.startswith("psi:") else right
        t, v = zip(*points, strict=True)
        axis.plot(np.subtract(t, start), v, marker=".", label=name)
        bound = thresholds[name]["high"] if name.startswith("psi:") else thresholds[name]["low"]
        axis.axhline(bound, color="red", linestyle="--", linewidth=0.8)
    left.set(title="PSI per window (alert above the dashed line)", xlabel="seconds", ylabel="PSI")
    right.set(title="p-values (alert below the dashed line)", xlabel="seconds", ylabel="p", yscale="log")
    for axis in (left, right):
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rates(history: list[dict], path: Path) -> None:
    """The favourable-outcome rate of each group per window."""
    fig, axis = plt.subplots(figsize=(7, 4))
    start = min((w["end"] for w in history if w["end"]), default=0)
    groups = sorted({g for w in history for g in w["selection_rates"]})
    for group in groups:
        rates = [(w["end"], w["selection_rates"].get(group)) for w in history]
        points = [(end - start, rate) for end, rate in rates if rate is not None]
        if points:
            axis.plot(*zip(*points, strict=True), marker=".", label=f"group {plain(group)}")
    axis.set(title="favourable rate per group", xlabel="seconds", ylabel="selection rate", ylim=(0, 1))
    if groups:
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _labelled(history: list[dict]) -> list[dict]:
    """The windows that had late labels (windows judged before performance was reported have none)."""
    return [w for w in history if w.get("performance") and w["performance"]["overall"]["labelled"]]


def plot_performance(history: list[dict], path: Path) -> None:
    """Accuracy, macro recall and macro F1 of each window with late labels: over all its labels and per group."""
    windows = _labelled(history)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4), sharey=True)
    start = min((w["end"] for w in history if w["end"]), default=0)
    groups = sorted({g for w in windows for g in w["performance"]["groups"]})
    for axis, metric in zip(axes, METRICS, strict=True):
        for group in [None, *groups]:
            sets = [(w["end"], _scores(w, group)) for w in windows]
            points = [(end - start, got[metric]) for end, got in sets if got and got[metric] is not None]
            if points:
                axis.plot(
                    *zip(*points, strict=True), marker=".", label="all" if group is None else f"group {plain(group)}"
                )
        axis.set(title=f"{metric} from late labels", xlabel="seconds", ylim=(0, 1.05))
        if axis.lines:
            axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scores(window: dict, group: str | None) -> dict | None:
    performance = window["performance"]
    return performance["overall"] if group is None else performance["groups"].get(group)


def _performance_rows(history: list[dict]) -> str:
    """A table row per group (and all together) of the latest window with late labels."""
    windows = _labelled(history)
    if not windows:
        return ""
    latest = windows[-1]["performance"]
    sets = [("all", latest["overall"]), *sorted(latest["groups"].items())]
    cell = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    return "".join(
        f"<tr><td>{html.escape(str(name))}</td><td>{got['labelled']}</td>"
        + "".join(f"<td>{cell(got[m])}</td>" for m in METRICS)
        + "</tr>"
        for name, got in sets
    )


def plot_histograms(window: WindowState, ref: ReferenceProfile, names: list[str], path: Path) -> None:
    """Reference versus live shares on the reference's bins, one panel per signal."""
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.5), squeeze=False)
    for axis, name in zip(axes[0], names, strict=False):
        profile = ref.signals()[name]
        reference = np.asarray(profile.counts, dtype=float)
        live = window.histogram(name)[: len(reference)].astype(float)
        cells = np.arange(len(reference))
        axis.bar(cells - 0.2, reference / max(reference.sum(), 1), 0.4, label="reference")
        axis.bar(cells + 0.2, live / max(live.sum(), 1), 0.4, label="live")
        axis.set(title=name, xlabel="bin" if profile.kind == "numeric" else "class", ylabel="share")
        if profile.kind == "categorical":
            axis.set_xticks(cells, [str(c) for c in profile.categories], fontsize=7)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Write report.html and its PNGs (into `out`, default the monitor folder); returns the HTML path."""
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    state = json.loads((folder / "state.json").read_text())
    history = state["history"]
    plot_drift(history, out / "drift.png")
    plot_rates(history, out / "selection_rates.png")
    latest = history[-1]["checks"] if history else []
    psi = [c for c in latest if c["name"].startswith("psi:") and c["value"] is not None]
    drifted = sorted(psi, key=lambda c: -c["value"])[:3]
    run_dir = folder.parent.parent
    ref_dir = run_dir / (state.get("reference") or "model")  # the one the monitor judged against (int8's own)
    images = ["drift.png", "selection_rates.png"]
    if _labelled(history):
        plot_performance(history, out / "performance.png")
        images.append("performance.png")
    if drifted and (ref_dir / "reference.json").exists():
        current = Windows.current_of(state["windows"])
        plot_histograms(current, load_reference(ref_dir), [c["name"][4:] for c in drifted], out / "hist.png")
        images.append("hist.png")
    rows = "".join(
        f"<tr><td>{html.escape(c['name'])}</td><td>{c['value']}</td><td>[{c['low']}, {c['high']}]</td>"
        f"<td class={c['status']}>{c['status']}</td></tr>"
        for c in latest
    )
    performance = _performance_rows(history)
    heads = "".join(f"<th>{m}</th>" for m in METRICS)
    labelled = (
        f"<h2>Latest window with late labels</h2><table><tr><th>group</th><th>labelled</th>{heads}</tr>"
        f"{performance}</table>"
        if performance
        else ""
    )
    alerts = "".join(f"<li>{html.escape(a['name'])} = {a['value']}</li>" for a in state["alerts"]["open"].values())
    page = f"""<!doctype html><meta charset="utf-8"><title>steward monitor: {html.escape(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px}} .fail{{color:#c00}} .ok{{color:#080}}</style>
<h1>Monitor of {html.escape(folder.name)}</h1>
<p>{state["records"]} records, {len(history)} windows closed. Run: {html.escape(str(run_dir))}</p>
<h2>Open alerts</h2><ul>{alerts or "<li>none</li>"}</ul>
<h2>Latest window</h2><table><tr><th>check</th><th>value</th><th>allowed</th><th>status</th></tr>{rows}</table>
{labelled}
{"".join(f'<p><img src="{name}"></p>' for name in images)}
"""
    (out / "report.html").write_text(page)
    return out / "report.html"
