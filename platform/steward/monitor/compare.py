"""Two arms of one deployment compared on the same traffic: the rollout's gates, judged over a step's window reports
(`checks.window_report`) and the replicas' per-arm request counts.

A gate is "fail" (the challenger is shown worse: roll back), "insufficient" (too little evidence yet: it decides
nothing) or "ok". A step goes on once the challenger has min_records records in it and no gate fails.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from steward.spec.rollout import GatesSpec

ARMS = ("champion", "challenger")
LATENCY_SAMPLE = 5000  # latencies an arm keeps per step: a p50 needs no more
Z_95 = 1.645  # one-sided 95%: a gap fails only when it is over its limit beyond chance


@dataclass
class ArmStats:
    """One arm's requests since a point in time: answered or failed, latency, and (shadow) agreement."""

    requests: int = 0
    errors: int = 0  # requests the arm's model failed (a client's bad input is not its failure)
    latency_ms: list[float] = field(default_factory=list)  # a sample of the answered requests' latencies
    mirrored: int = 0  # shadow: records both arms classified
    agreed: int = 0  # of those, classified alike

    def add(self, other: ArmStats) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.mirrored += other.mirrored
        self.agreed += other.agreed
        self.latency_ms += other.latency_ms
        if len(self.latency_ms) > LATENCY_SAMPLE:
            self.latency_ms = random.sample(self.latency_ms, LATENCY_SAMPLE)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def p50_ms(self) -> float | None:
        ordered = sorted(self.latency_ms)
        return ordered[len(ordered) // 2] if ordered else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.mirrored if self.mirrored else None

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "p50_ms": self.p50_ms,
            "mirrored": self.mirrored,
            "agreement": self.agreement,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gate:
    """One gate's verdict: the value compared with its limit, for which arm and groups."""

    gate: str
    status: str  # ok | fail | insufficient
    value: float | None = None
    limit: float | None = None
    arm: str = "challenger"
    detail: dict[str, Any] = field(default_factory=dict)  # the metric, groups and each arm's values

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Judgement:
    decision: str  # rollback | hold | advance
    gates: list[Gate]
    records: int  # the challenger's records in the step's windows

    @property
    def failed(self) -> list[Gate]:
        return [g for g in self.gates if g.status == "fail"]


def judge_step(
    windows: dict[str, list[dict]],
    new: list[dict],
    stats: dict[str, ArmStats],
    gates: GatesSpec,
    min_records: int,
) -> Judgement:
    """The gates over a step: `windows` are each arm's window reports closed in it, `new` the challenger's not
    judged before (bias and drift fail on any of them), `stats` each arm's requests in it."""
    champion, challenger = stats["champion"], stats["challenger"]
    latest = windows["champion"][-1] if windows["champion"] else None
    verdicts: list[Gate] = []
    for window in new:
        if gates.bias:
            verdicts += _bias(window)
        if gates.drift:
            verdicts += _drift(window, latest)
        if gates.max_selection_rate_gap is not None:
            verdicts.append(_selection_gap(window, windows["champion"], gates.max_selection_rate_gap))
    verdicts.append(_compare("error_rate", challenger.error_rate, champion.error_rate, gates.max_error_rate_increase))
    verdicts.append(_ratio("latency_p50", challenger.p50_ms, champion.p50_ms, gates.max_latency_ratio))
    if challenger.mirrored:
        agreement, limit = challenger.agreement, gates.min_agreement
        status = "ok" if limit is None or (agreement or 0.0) >= limit else "fail"
        verdicts.append(Gate("agreement", status, agreement, limit, "both"))
    drops = {"accuracy": gates.max_accuracy_drop, "recall": gates.max_recall_drop, "f1_macro": gates.max_f1_drop}
    for metric, limit in drops.items():
        if limit is not None:
            verdicts += _label_metric(windows, metric, limit, gates.min_labels)
    records = sum(w["records"] for w in windows["challenger"])
    if any(v.status == "fail" for v in verdicts):
        decision = "rollback"
    else:
        decision = "advance" if records >= min_records else "hold"
    return Judgement(decision, verdicts, records)


def _bias(window: dict) -> list[Gate]:
    rates = window.get("selection_rates", {})
    return [
        Gate(
            f"bias:{check['name']}",
            check["status"],
            check["value"],
            _violated(check),
            detail={"metric": check["name"], "bounds": [check["low"], check["high"]], "selection_rates": rates},
        )
        for check in window["checks"]
        if check["kind"] == "bias"
    ]


def _violated(check: dict) -> float:
    """The bound a check's value is past (or nearest to): high for a statistic, low for a p-value."""
    value = check["value"]
    return check["high"] if value is not None and value > check["high"] else check["low"]


def _drift(window: dict, champion: dict | None) -> list[Gate]:
    """The challenger's failing drift checks that the champion's latest window passes (or does not have)."""
    champion_failing = {c["name"] for c in (champion or {}).get("checks", []) if c["status"] == "fail"}
    return [
        Gate(
            f"drift:{check['name']}",
            "ok" if check["name"] in champion_failing else "fail",
            check["value"],
            _violated(check),
            detail={"bounds": [check["low"], check["high"]], "champion_fails_too": check["name"] in champion_failing},
        )
        for check in window["checks"]
        if check["kind"] == "drift" and check["status"] == "fail"
    ]


def _selection_gap(window: dict, champion: list[dict], limit: float) -> Gate:
    """The group whose favourable rate differs most between the challenger's `window` and the champion's windows of
    the step (pooled): failing only when the gap is over `limit` with 95% confidence, since in a canary the arms
    answer different requests and a window's rate moves by chance."""
    mine, theirs = _pooled_rates([window]), _pooled_rates(champion)
    gaps = {g: mine[g][0] - theirs[g][0] for g in mine.keys() & theirs.keys()}
    if not gaps:
        return Gate("selection_rate_gap", "insufficient", None, limit)
    group = max(gaps, key=lambda g: abs(gaps[g]))
    (p1, n1), (p2, n2) = mine[group], theirs[group]
    margin = Z_95 * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    detail = {
        "group": group,
        "challenger": {g: r for g, (r, _) in mine.items()},
        "champion": {g: r for g, (r, _) in theirs.items()},
        "margin": margin,
    }
    status = "fail" if abs(gaps[group]) - margin > limit else "ok"
    return Gate("selection_rate_gap", status, gaps[group], limit, detail=detail)


def _pooled_rates(windows: list[dict]) -> dict[str, tuple[float, int]]:
    """Each group's favourable rate over `windows` and the records it is out of (windows from before reports
    counted records per group are left out)."""
    totals: dict[str, list[float]] = {}
    for window in windows:
        for group, n in window.get("group_records", {}).items():
            rate = window["selection_rates"].get(group)
            if n and rate is not None:
                total = totals.setdefault(group, [0.0, 0])
                total[0] += rate * n
                total[1] += n
    return {group: (selected / n, int(n)) for group, (selected, n) in totals.items()}


def _compare(name: str, mine: float | None, theirs: float | None, limit: float) -> Gate:
    if mine is None or theirs is None:
        return Gate(name, "insufficient", mine, limit)
    status = "ok" if mine - theirs <= limit else "fail"
    return Gate(name, status, mine - theirs, limit, detail={"challenger": mine, "champion": theirs})


def _ratio(name: str, mine: float | None, theirs: float | None, limit: float | None) -> Gate:
    if mine is None or theirs is None or theirs <= 0:
        return Gate(name, "insufficient", None, limit)
    ratio = mine / theirs
    status = "ok" if limit is None or ratio <= limit else "fail"
    return Gate(name, status, ratio, limit, detail={"challenger_ms": mine, "champion_ms": theirs})


def pooled_scores(windows: list[dict], metric: str) -> dict[str, tuple[float, int]]:
    """`metric` (accuracy, recall, f1_macro) over the late labels of `windows`, each window weighted by its labels,
    overall ("(all)") and per group: {group: (value, labelled)}."""
    totals: dict[str, list[float]] = {}
    for window in windows:
        performance = window.get("performance") or {"overall": {}, "groups": {}}
        for group, scores in [("(all)", performance["overall"]), *performance["groups"].items()]:
            labelled, value = scores.get("labelled", 0), scores.get(metric)
            if labelled and value is not None:
                total = totals.setdefault(group, [0.0, 0])
                total[0] += value * labelled
                total[1] += labelled
    return {group: (weighted / n, int(n)) for group, (weighted, n) in totals.items()}


def _label_metric(windows: dict[str, list[dict]], metric: str, limit: float, min_labels: int) -> list[Gate]:
    """The challenger's drop in `metric` below the champion's, overall and per group, once both have the labels."""
    champion, challenger = pooled_scores(windows["champion"], metric), pooled_scores(windows["challenger"], metric)
    verdicts = []
    for group in sorted(champion.keys() & challenger.keys()):
        (mine, n_mine), (theirs, n_theirs) = challenger[group], champion[group]
        name = metric if group == "(all)" else f"{metric}:{group}"
        if min(n_mine, n_theirs) < min_labels:
            verdicts.append(Gate(name, "insufficient", None, limit))
            continue
        drop = theirs - mine
        detail = {"group": group, "challenger": mine, "champion": theirs, "labels": [n_theirs, n_mine]}
        verdicts.append(Gate(name, "ok" if drop <= limit else "fail", drop, limit, detail=detail))
    return verdicts
