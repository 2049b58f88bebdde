"""`steward rollout report`: one HTML page for one rollout, its champion and challenger side by side.

From what the rollout saved (`<output_dir>/rollouts/<deployment>/<id>/`: state.json and events.jsonl) and what each
arm's monitor saved (`<run_dir>/monitor/<deployment>/state.json`): the rollout's mode, state, steps and share, its
decisions with the gates that failed them, and for each arm the windows that closed while the rollout ran: selection
rates per group and the drift and bias checks over time, plotted with `monitor.report`'s plots.
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from steward.errors import StewardError  # noqa: E402
from steward.monitor.compare import ARMS  # noqa: E402
from steward.monitor.report import plot_drift, plot_rates, series  # noqa: E402

ENDED = ("promoted", "rolled_back", "aborted")  # the decisions that end the arms' comparison


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def _when(t: float | None) -> str:
    return "–" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def read_rollout(folder: Path) -> tuple[dict, dict, list[dict]]:
    """The rollout's state (with the challenger's share), target and every decision (events.jsonl keeps them all;
    state.json the latest)."""
    path = folder / "state.json"
    if not path.exists():
        raise StewardError(
            f"{folder}: no rollout state here (expected <output_dir>/rollouts/<deployment>/<rollout-id>/state.json); "
            f"start one with `steward rollout start`"
        )
    doc = json.loads(path.read_text())
    events = folder / "events.jsonl"
    decisions = (
        [json.loads(line) for line in events.read_text().splitlines() if line.strip()]
        if events.exists()
        else doc["state"]["decisions"]
    )
    return {**doc["state"], "share": doc["share"]}, doc["target"], decisions


def monitor_folder(run: str, deployment: str, folder: Path) -> Path:
    """An arm's monitor folder: under its run folder as recorded, or, when the output folder was moved or copied,
    under the run of the same job and id beside this rollout's `rollouts/` folder."""
    recorded = Path(run) / "monitor" / deployment
    moved = folder.parents[2] / Path(run).parent.name / Path(run).name / "monitor" / deployment
    return recorded if recorded.exists() or not moved.exists() else moved


def span(decisions: list[dict]) -> tuple[float | None, float | None]:
    """When the rollout started, and when it stopped comparing the arms (None while it runs)."""
    started = next((d["time"] for d in decisions if d["decision"] == "started"), None)
    ended = next((d["time"] for d in decisions if d["decision"] in ENDED), None)
    return started, ended


def during(history: list[dict], started: float | None, ended: float | None) -> list[dict]:
    """The windows that closed while the rollout compared the arms."""
    end = lambda w: w.get("end") or 0.0  # noqa: E731
    return [w for w in history if (started is None or end(w) >= started) and (ended is None or end(w) <= ended)]


def plot_bias(history: list[dict], path: Path) -> None:
    """Each bias metric per window, its allowed bounds dashed in its colour."""
    fig, axis = plt.subplots(figsize=(7, 4))
    start = min((w["end"] for w in history if w["end"]), default=0)
    bounds = {c["name"]: (c["low"], c["high"]) for w in history for c in w["checks"] if c["kind"] == "bias"}
    for name, points in sorted(series(history, "bias").items()):
        t, v = zip(*points, strict=True)
        (line,) = axis.plot(np.subtract(t, start), v, marker=".", label=name)
        for bound in bounds[name]:
            axis.axhline(bound, color=line.get_color(), linestyle="--", linewidth=0.8)
    axis.set(title="bias metrics per window (alert outside the dashed lines)", xlabel="seconds", ylabel="value")
    if axis.lines:
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _groups(detail: dict) -> str:
    """The groups a gate names, with each arm's value where it has them."""
    group = detail.get("group")
    if group is not None:
        mine, theirs = detail.get("challenger"), detail.get("champion")
        if isinstance(mine, dict) and isinstance(theirs, dict):
            mine, theirs = mine.get(group), theirs.get(group)
        margin = f" (margin {_num(detail['margin'])})" if "margin" in detail else ""
        return f"group {_e(group)}: champion {_num(theirs)}, challenger {_num(mine)}{margin}"
    rates = detail.get("selection_rates") or {}
    return ", ".join(f"{_e(g)} {_num(r)}" for g, r in sorted(rates.items()))


def _gate_rows(gates: list[dict]) -> str:
    rows = []
    for g in gates:
        detail = g.get("detail") or {}
        bounds = detail.get("bounds")
        allowed = f"[{_num(bounds[0])}, {_num(bounds[1])}]" if bounds else ""
        status = _e(g["status"])
        rows.append(
            f"<tr><td>{_e(g['gate'])}</td><td>{_e(g['arm'])}</td><td>{_num(g['value'])}</td><td>{_num(g['limit'])}"
            f"</td><td>{allowed}</td><td>{_groups(detail)}</td><td class='{status}'>{status}</td></tr>"
        )
    head = "<tr><th>gate</th><th>arm</th><th>value</th><th>limit</th><th>allowed</th><th>groups</th><th>status</th>"
    return f"<table>{head}</tr>{''.join(rows)}</table>" if rows else ""


def _timeline(decisions: list[dict]) -> str:
    """A row per decision: when, what, at which step, its own fields, and the gates that failed it."""
    rows = []
    for d in decisions:
        said = {k: d[k] for k in ("share", "records", "reason", "by", "mode", "steps") if k in d}
        fields = ", ".join(f"{_e(k)}: {_num(v)}" for k, v in said.items())
        failed = _gate_rows(d.get("failed", []))
        rows.append(
            f"<tr><td>{_when(d['time'])}</td><td class='{_e(d['decision'])}'>{_e(d['decision'])}</td>"
            f"<td>{_num(d.get('step'))}</td><td>{fields}</td><td>{failed}</td></tr>"
        )
    head = "<tr><th>time</th><th>decision</th><th>step (from 0)</th><th></th><th>failing gates</th></tr>"
    return f"<table class=timeline>{head}{''.join(rows)}</table>"


def _arm_requests(decisions: list[dict]) -> str:
    """Each arm's error rate and p50 latency as the last judged decision's gates saw them."""
    judged = [d for d in decisions if "gates" in d]
    if not judged:
        return "<p>No judged decision yet.</p>"
    gates = {g["gate"]: g.get("detail") or {} for g in judged[-1]["gates"]}
    errors, latency = gates.get("error_rate", {}), gates.get("latency_p50", {})
    rows = "".join(
        f"<tr><td>{arm}</td><td>{_num(errors.get(arm))}</td><td>{_num(latency.get(f'{arm}_ms'))}</td></tr>"
        for arm in ARMS
    )
    return (
        f"<p>At the last judged decision ({_e(judged[-1]['decision'])}, {_when(judged[-1]['time'])}; "
        f"{_num(judged[-1].get('records'))} challenger records in the step):</p>"
        f"<table><tr><th>arm</th><th>error rate</th><th>p50 latency (ms)</th></tr>{rows}</table>"
    )


def _rates_table(windows: dict[str, list[dict]]) -> str:
    """Per group: each arm's selection rate in its latest window of the rollout and its mean over them."""
    groups = sorted({g for history in windows.values() for w in history for g in w["selection_rates"]})

    def rates(arm: str, group: str) -> list[float]:
        return [r for w in windows[arm] if (r := w["selection_rates"].get(group)) is not None]

    def cells(arm: str, group: str) -> str:
        got = rates(arm, group)
        return f"<td>{_num(got[-1] if got else None)}</td><td>{_num(sum(got) / len(got) if got else None)}</td>"

    rows = "".join(f"<tr><td>{_e(g)}</td>{''.join(cells(arm, g) for arm in ARMS)}</tr>" for g in groups)
    heads = "".join(f"<th>{arm} latest</th><th>{arm} mean</th>" for arm in ARMS)
    return f"<table><tr><th>group</th>{heads}</tr>{rows}</table>" if rows else "<p>No selection rates yet.</p>"


def _arm_column(arm: str, run: str, folder: Path, history: list[dict] | None, state: dict, out: Path) -> str:
    """One arm's column: its run, windows, latest checks, open alerts and plots over the rollout's windows."""
    title = f"<h2>{arm}</h2><p>Run {_e(Path(run).name)} ({_e(run)})</p>"
    if history is None:
        return f"<div>{title}<p>No monitor state at {_e(folder)}: no traffic reached this arm's monitor.</p></div>"
    if not history:
        return f"<div>{title}<p>No window of this arm closed while the rollout compared the arms.</p></div>"
    images = {"selection_rates": plot_rates, "bias": plot_bias, "drift": plot_drift}
    for name, plot in images.items():
        plot(history, out / f"{arm}-{name}.png")
    checks = "".join(
        f"<tr><td>{_e(c['name'])}</td><td>{_num(c['value'])}</td><td>[{_num(c['low'])}, {_num(c['high'])}]</td>"
        f"<td class='{_e(c['status'])}'>{_e(c['status'])}</td></tr>"
        for c in history[-1]["checks"]
        if c["kind"] in ("bias", "drift")
    )
    alerts = "".join(f"<li>{_e(a['name'])} = {_num(a['value'])}</li>" for a in state["alerts"]["open"].values())
    return (
        f"<div>{title}<p>{len(history)} windows, {sum(w['records'] for w in history)} records in the rollout.</p>"
        f"<h3>Latest window's checks</h3><table><tr><th>check</th><th>value</th><th>allowed</th><th>status</th></tr>"
        f"{checks}</table><h3>Open alerts now</h3><ul>{alerts or '<li>none</li>'}</ul>"
        + "".join(f'<p><img src="{arm}-{name}.png"></p>' for name in images)
        + "</div>"
    )


def write_rollout_report(folder: Path, out: Path | None = None) -> Path:
    """Write report.html and its PNGs (into `out`, default the rollout folder); returns the HTML path."""
    state, target, decisions = read_rollout(folder)
    out = out or folder
    out.mkdir(parents=True, exist_ok=True)
    deployment, rollout = target["deployment"], target["rollout"]
    started, ended = span(decisions)
    windows: dict[str, list[dict]] = {}
    columns = []
    for arm in ARMS:
        monitor = monitor_folder(target[arm], deployment, folder)
        saved = json.loads((monitor / "state.json").read_text()) if (monitor / "state.json").exists() else None
        windows[arm] = during(saved["history"], started, ended) if saved else []
        history = windows[arm] if saved else None
        columns.append(_arm_column(arm, target[arm], monitor, history, saved or {}, out))
    steps = rollout["steps"]
    judged = [d for d in decisions if "gates" in d]
    last_gates = (_gate_rows(judged[-1]["gates"]) or "<p>No gates.</p>") if judged else "<p>No judged decision yet.</p>"
    page = f"""<!doctype html><meta charset="utf-8"><title>steward rollout: {_e(deployment)} {_e(folder.name)}</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 8px;vertical-align:top;text-align:left}}
.fail,.rolled_back,.aborted,.promotion_refused{{color:#c00}} .ok,.promoted{{color:#080}}
.arms{{display:grid;grid-template-columns:1fr 1fr;gap:2em}} .arms img{{max-width:100%}}</style>
<h1>Rollout of {_e(deployment)}: {_e(state["state"])}</h1>
<table><tr><td>rollout</td><td>{_e(folder.name)}</td></tr><tr><td>mode</td><td>{_e(rollout["mode"])}</td></tr>
<tr><td>state</td><td class="{_e(state["state"])}">{_e(state["state"])}</td></tr>
<tr><td>step (from 0)</td><td>{state["step"]} of shares {", ".join(_num(s) for s in steps)}</td></tr>
<tr><td>challenger share now</td><td>{_num(state["share"])}</td></tr>
<tr><td>compared</td><td>{_when(started)} to {_when(ended) if ended else "now (running)"}</td></tr>
<tr><td>champion</td><td>{_e(target["champion"])}</td></tr><tr><td>challenger</td><td>{_e(target["challenger"])}</td></tr>
</table>
<h2>Decisions</h2>{_timeline(decisions)}
<h2>Gates of the last judged decision</h2>{last_gates}
<h2>Requests per arm</h2>{_arm_requests(decisions)}
<h2>Selection rate per group</h2>{_rates_table(windows)}
<div class=arms>{"".join(columns)}</div>
"""
    (out / "report.html").write_text(page)
    return out / "report.html"
