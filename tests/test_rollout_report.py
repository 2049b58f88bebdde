"""The rollout's HTML report, from a rollout folder and both arms' monitor folders written by hand in the shapes the
rollout actor (serve/rollout.py `_save`, `_decide`) and the monitor actor (monitor/actor.py `_snapshot`) save; and the
shipped Grafana dashboard and Prometheus rules, read against the metrics and labels the code declares. No Ray."""

import ast
import json
import re
from pathlib import Path

import pytest
import yaml

from steward.errors import StewardError
from steward.monitor.checks import window_report
from steward.monitor.compare import Gate
from steward.monitor.rollout_report import write_rollout_report
from steward.monitor.window_state import WindowState
from steward.spec.monitor import MonitorSpec
from steward.spec.rollout import RolloutSpec
from tests.conftest import ROOT

T0 = 1_800_000_000.0  # the rollout starts
HOSTILE = "<script>alert(1)</script>"
SPD = "statistical_parity_difference"


def check(name, kind, value, low, high):
    status = "ok" if low <= value <= high else "fail"
    return {"name": name, "kind": kind, "value": value, "low": low, "high": high, "status": status}


def window(end, records, rates, spd, psi):
    """A window report as monitor/checks.py `window_report` makes it."""
    checks = [check(SPD, "bias", spd, -0.2, 0.2), check("psi:prediction.class", "drift", psi, 0.0, 0.2)]
    performance = {"overall": {"labelled": 0, "accuracy": None, "recall": None, "f1_macro": None}, "groups": {}}
    return {
        "records": records,
        "invalid_records": 0,
        "start": end - 5,
        "end": end,
        "checks": checks,
        "selection_rates": rates,
        "performance": performance,
    }


def monitor_state(history, open_alerts=None):
    """A monitor's state.json as monitor/actor.py `_snapshot` saves it."""
    return {
        "records": sum(w["records"] for w in history),
        "reference": "model",
        "windows": {"pane_id": 0, "pane": {}, "panes": []},
        "history": history,
        "alerts": {"streaks": {}, "open": open_alerts or {}},
        "applied": {},
        "ahead": {},
        "saved": T0 + 60,
    }


def gate(name, status, value, limit, **detail):
    return {"gate": name, "status": status, "value": value, "limit": limit, "arm": "challenger", "detail": detail}


def write(path: Path, doc) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def rollout_folder(
    out: Path, champion: Path, challenger: Path, decisions, state="rolled_back", step=0, steps=None, share=0.0
):
    """A rollout folder as serve/rollout.py saves it: state.json (`_save`) and events.jsonl (`_decide`)."""
    folder = out / "rollouts" / "canary" / "20261207-170000-abcd"
    section = RolloutSpec.model_validate({"mode": "canary", "steps": steps or [0.5]}).model_dump(mode="json")
    saved = {"state": state, "step": step, "step_started": T0, "judged_until": T0 + 20, "decisions": decisions}
    target = {"deployment": "canary", "champion": str(champion), "challenger": str(challenger), "rollout": section}
    write(folder / "state.json", {"state": saved, "share": share, "target": target})
    (folder / "events.jsonl").write_text("".join(json.dumps(d) + "\n" for d in decisions))
    return folder


def test_the_hand_written_shapes_are_the_ones_the_code_writes():
    """The fixtures below stand for real saves: a real window report has their keys, a real gate the same."""
    spec = MonitorSpec.model_validate({"bias": {"group": "g", "favourable": "x", "privileged": "a", "metrics": [SPD]}})
    state = WindowState()
    state.add_batch(["x", "y"] * 10, ["a", "b"] * 10, t=1.0)
    real = window_report(state, None, spec)
    mine = window(T0, 20, {"a": 0.5}, 0.0, 0.0)
    assert mine.keys() <= real.keys() and mine["checks"][0].keys() == real["checks"][0].keys()
    assert mine["performance"]["overall"].keys() == real["performance"]["overall"].keys()
    assert gate("g", "ok", 0.0, 0.1).keys() == Gate("g", "ok").to_dict().keys()


@pytest.fixture
def rolled_back(tmp_path):
    """A canary rolled back for bias against group b: the champion fair, the challenger not, a client's hostile
    group name in both arms' rates and a group named `$$` (maths to matplotlib)."""
    out = tmp_path / "out"
    champion, challenger = out / "fair-text" / "20261207-165000-aaaa", out / "fair-text" / "20261207-165500-bbbb"
    odd = {HOSTILE: 0.5, "$$": 0.5}
    champion_windows = [
        window(T0 - 100, 200, {"a": 0.777, "b": 0.5, **odd}, 0.01, 0.01),  # before the rollout: not in the page
        window(T0 + 10, 100, {"a": 0.55, "b": 0.52, **odd}, -0.03, 0.05),
        window(T0 + 20, 100, {"a": 0.56, "b": 0.53, **odd}, -0.03, 0.04),
        window(T0 + 100, 200, {"a": 0.888, "b": 0.5, **odd}, 0.02, 0.03),  # after the rollback: not in the page
    ]
    challenger_windows = [
        window(T0 + 12, 100, {"a": 0.61, "b": 0.23, **odd}, -0.38, 0.06),
        window(T0 + 20, 100, {"a": 0.62, "b": 0.21, **odd}, -0.41, 0.31),
    ]
    alert = {SPD: {"event": "alert", "time": T0 + 20, "windows": 1, **check(SPD, "bias", -0.41, -0.2, 0.2)}}
    write(champion / "monitor" / "canary" / "state.json", monitor_state(champion_windows))
    write(challenger / "monitor" / "canary" / "state.json", monitor_state(challenger_windows, alert))
    rates = {"a": 0.62, "b": 0.21, HOSTILE: 0.5}
    failed = [
        gate(f"bias:{SPD}", "fail", -0.41, -0.2, metric=SPD, bounds=[-0.2, 0.2], selection_rates=rates),
        gate("selection_rate_gap", "fail", -0.32, 0.1, group="b", champion={"a": 0.56, "b": 0.53}, challenger=rates),
    ]
    judged = [
        *failed,
        gate("error_rate", "ok", 0.0, 0.01, challenger=0.004, champion=0.004),
        gate("latency_p50", "ok", 1.0303, None, challenger_ms=3.4, champion_ms=3.3),
    ]
    decisions = [
        {"decision": "started", "time": T0, "step": 0, "mode": "canary", "steps": [0.5]},
        {"decision": "rolled_back", "time": T0 + 21, "step": 0, "records": 200, "failed": failed, "gates": judged},
    ]
    return rollout_folder(out, champion, challenger, decisions), tmp_path / "report"


def test_the_page_shows_both_arms_side_by_side_and_why_the_rollout_rolled_back(rolled_back):
    folder, out = rolled_back
    page = write_rollout_report(folder, out).read_text()
    assert "Rollout of canary: rolled_back" in page and "<td>mode</td><td>canary</td>" in page
    assert "<td>challenger share now</td><td>0</td>" in page  # rolled back: every request is the champion's
    timeline = page[page.index("<h2>Decisions</h2>") : page.index("<h2>Gates of the last judged decision</h2>")]
    assert timeline.count("<tr><td>2027-01-15") == 2 and "started" in timeline and "rolled_back" in timeline
    # the failing gates' reasons: which gate, for which arm, its value and limit, and the groups it saw
    assert f"<td>bias:{SPD}</td><td>challenger</td><td>-0.41</td><td>-0.2</td><td>[-0.2, 0.2]</td>" in timeline
    assert "<td>selection_rate_gap</td><td>challenger</td><td>-0.32</td><td>0.1</td>" in timeline
    assert "group b: champion 0.53, challenger 0.21" in timeline
    assert "error_rate" not in timeline  # it passed: not among the failing gates
    # each arm's requests as the last judgement saw them
    assert "<tr><td>champion</td><td>0.004</td><td>3.3</td></tr>" in page
    assert "<tr><td>challenger</td><td>0.004</td><td>3.4</td></tr>" in page
    # selection rates per group: each arm's latest window and mean, over the rollout's windows only
    assert "<tr><td>b</td><td>0.53</td><td>0.525</td><td>0.21</td><td>0.22</td></tr>" in page
    assert "0.777" not in page and "0.888" not in page
    # the two columns, champion then challenger, each with its latest checks, alerts and plots
    arms = page[page.index("<div class=arms>") :]
    champion, challenger = arms.split("<h2>challenger</h2>")
    assert "<h2>champion</h2>" in champion and "2 windows, 200 records" in champion
    assert f"<td>{SPD}</td><td>-0.03</td><td>[-0.2, 0.2]</td><td class='ok'>ok</td>" in champion
    assert f"<td>{SPD}</td><td>-0.41</td><td>[-0.2, 0.2]</td><td class='fail'>fail</td>" in challenger
    assert "<li>none</li>" in champion and f"<li>{SPD} = -0.41</li>" in challenger
    for arm in ("champion", "challenger"):
        for plot in ("selection_rates", "bias", "drift"):
            assert f'<img src="{arm}-{plot}.png">' in page and (out / f"{arm}-{plot}.png").stat().st_size > 1000
    # a client's group name is text on the page, never markup
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_running_rollout_moved_elsewhere_with_one_arm_not_monitored_yet(tmp_path):
    """The output folder copied from where the rollout ran: the arms' monitors are found beside it; an arm without a
    monitor state says so; a running rollout's share is its step's."""
    out = tmp_path / "copied"
    elsewhere = Path("/cluster/out/fair-text")
    history = [window(T0 + 10, 100, {"a": 0.5, "b": 0.5}, 0.0, 0.01)]
    write(out / "fair-text" / "20261207-165000-aaaa" / "monitor" / "canary" / "state.json", monitor_state(history))
    started = {"decision": "started", "time": T0, "step": 0, "mode": "canary", "steps": [0.1, 0.25, 0.5]}
    step = {"decision": "step", "time": T0 + 15, "step": 1, "share": 0.25, "records": 250, "failed": [], "gates": []}
    champion, challenger = elsewhere / "20261207-165000-aaaa", elsewhere / "20261207-165500-bbbb"
    folder = rollout_folder(out, champion, challenger, [started, step], "running", 1, [0.1, 0.25, 0.5], 0.25)
    page = write_rollout_report(folder).read_text()
    assert (folder / "report.html").exists() and "<td>challenger share now</td><td>0.25</td>" in page
    assert "to now (running)" in page and "share: 0.25, records: 250" in page
    champion_column, challenger_column = page[page.index("<div class=arms>") :].split("<h2>challenger</h2>")
    assert "1 windows, 100 records" in champion_column and (folder / "champion-bias.png").exists()
    assert "No monitor state at /cluster/out/fair-text/20261207-165500-bbbb/monitor/canary" in challenger_column


def test_a_folder_without_a_rollout_state_is_a_user_error(tmp_path):
    with pytest.raises(StewardError, match="no rollout state here"):
        write_rollout_report(tmp_path)


# -- the shipped Grafana dashboard and Prometheus rules ----------------------------------------------------------


def declared_metrics() -> dict[str, set[str]]:
    """Every Prometheus metric platform/steward declares (ray.util.metrics Gauge, Counter, Histogram) by the name
    Ray exports it under, with its labels."""
    suffixes = {"Gauge": [""], "Counter": ["_total"], "Histogram": ["_bucket", "_sum", "_count"]}
    found: dict[str, set[str]] = {}
    for path in (ROOT / "platform" / "steward").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            kind = getattr(node, "func", None)
            kind = getattr(kind, "id", None) or getattr(kind, "attr", None)
            if not isinstance(node, ast.Call) or kind not in suffixes or not node.args:
                continue
            name = node.args[0]
            keys = (
                node.args[2]
                if len(node.args) > 2
                else next((k.value for k in node.keywords if k.arg == "tag_keys"), None)
            )
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and keys is not None:
                for suffix in suffixes[kind]:
                    found[f"ray_{name.value}{suffix}"] = set(ast.literal_eval(keys))
    return found


def queries() -> dict[str, str]:
    """Every PromQL expression shipped in serve/: the dashboard's panels and variables, the alert rules."""
    dashboard = json.loads((ROOT / "serve" / "grafana-monitor.json").read_text())
    out = {f"variable {v['name']}": v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}
    for panel in dashboard["panels"]:
        out |= {f"panel {panel['title']} {t['refId']}": t["expr"] for t in panel.get("targets", [])}
    rules = yaml.safe_load((ROOT / "serve" / "prometheus-alerts.yaml").read_text())
    return out | {f"rule {r['alert']}": r["expr"] for g in rules["groups"] for r in g["rules"]}


def test_every_shipped_query_names_metrics_and_labels_the_code_exports():
    declared = declared_metrics()
    assert {"ray_steward_rollout_state", "ray_steward_rollout_decisions_total"} <= declared.keys()
    rollout_metrics = set()
    for where, expr in queries().items():
        used = set(re.findall(r"\bray_steward_\w+", expr))
        assert used and used <= declared.keys(), (where, used - declared.keys())
        rollout_metrics |= {m for m in used if m.startswith("ray_steward_rollout_")}
        labels = set().union(*(declared[m] for m in used))
        for metric, selector in re.findall(r"(ray_steward_\w+)\{([^}]*)\}", expr):
            selected = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
            assert selected <= declared[metric], (where, metric, selected - declared[metric])
        for clause in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
            grouped = {label.strip() for label in clause.split(",")}
            assert grouped <= labels, (where, grouped - labels)
    assert rollout_metrics == {m for m in declared if m.startswith("ray_steward_rollout_")}  # each one shown


def test_the_dashboard_has_a_rollout_row_and_stays_importable():
    dashboard = json.loads((ROOT / "serve" / "grafana-monitor.json").read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"] == "steward-monitor"
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:  # no two panels overlap on Grafana's 24-column grid
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not mine & cells, p["title"]
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
            assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
    row = next(p for p in panels if p["type"] == "row")
    assert row["title"] == "Rollout" and row["panels"] == []
    below = [p for p in panels if p["gridPos"]["y"] > row["gridPos"]["y"]]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    for metric in ("share", "state", "gate", "gate_failing", "requests", "error_rate", "latency_p50_ms"):
        assert f"ray_steward_rollout_{metric}{{" in exprs, metric
    # the state timeline codes every state the rollout actor exports, and nothing else
    states = ast.literal_eval(
        re.search(r"^STATES = (\(.*\))$", (ROOT / "platform/steward/serve/rollout.py").read_text(), re.M)[1]
    )
    state_panel = next(p for p in below if p["title"] == "Rollout state")
    coded = re.findall(r'state="(\w+)"\}\) \* (\d)', state_panel["targets"][0]["expr"])
    mapped = state_panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert sorted(name for name, _ in coded) == sorted(states)
    assert all(mapped[code]["text"] == name for name, code in coded)
    failing = next(p for p in below if p["title"].startswith("Gate values"))
    highlighted = failing["fieldConfig"]["overrides"][0]
    assert "ray_steward_rollout_gate_failing" in failing["targets"][1]["expr"]
    assert highlighted["matcher"] == {"id": "byFrameRefID", "options": "B"}
    # the monitor's panels tell the arms apart
    above = [p for p in panels if p["gridPos"]["y"] < row["gridPos"]["y"]]
    assert all("arm" in p["targets"][0]["expr"] and "{{arm}}" in p["targets"][0]["legendFormat"] for p in above)


def test_the_rolled_back_alert_rule():
    rules = yaml.safe_load((ROOT / "serve" / "prometheus-alerts.yaml").read_text())
    by_name = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    rule = by_name["StewardRolloutRolledBack"]
    assert rule["expr"] == 'max by (deployment) (ray_steward_rollout_state{state="rolled_back"}) == 1'
    assert "{{ $labels.deployment }}" in rule["annotations"]["summary"]
    for name, rule in by_name.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical") and rule["annotations"]["summary"], name
