"""Judging windows: detection of an injected shift within a stated number of windows, the measured false-alarm
rate on unshifted traffic, bias checks on known counts, and alert streaks."""

import json

import numpy as np
import pytest
from scipy import stats

from steward.monitor.checks import (
    AlertTracker,
    Check,
    bias_checks,
    chi2_checks,
    drift_checks,
    live_state,
    performance_checks,
    window_report,
)
from steward.monitor.performance import window_performance
from steward.monitor.reference import PREDICTED_CLASS, build_reference
from steward.monitor.signals import record_signals
from steward.monitor.window_state import WindowState
from steward.spec.monitor import MonitorSpec

CLASSES = ["neg", "pos", "other"]
WINDOW = 500
SPEC = MonitorSpec.model_validate({"drift": {}, "alerts": {"consecutive_windows": 2}})


def records(rng, n, shift=0.0):
    """Sequence inputs (n, T=5, F=4), embeddings (n, 16) and class probabilities, all moved by `shift`."""
    x = rng.normal(shift, 1.0, size=(n, 5, 4))
    emb = rng.normal(shift, 1.0, size=(n, 16))
    logits = emb[:, :3] * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return x, emb, probs


@pytest.fixture(scope="module")
def reference():
    x, emb, probs = records(np.random.default_rng(0), 2000)
    s = record_signals("sequence", x, probs, CLASSES, emb)
    return build_reference(s.features, [f"feature_{i}" for i in range(4)], embeddings=emb, probs=probs, classes=CLASSES)


def window(reference, seed, shift=0.0):
    """A window filled the way a replica fills it: record by record through `record_signals`."""
    x, emb, probs = records(np.random.default_rng(seed), WINDOW, shift)
    s = record_signals("sequence", x, probs, CLASSES, emb)
    state, rows = WindowState(reference.bins(), seed=seed), s.rows(reference.bins().names)
    for i in range(WINDOW):
        samples = {"embedding": emb[i], "features": s.features[i]}
        state.add(s.predicted[i], None, rows[i], {PREDICTED_CLASS: s.predicted[i]}, samples)
    return state


def failing(report, prefix):
    return [c["name"] for c in report["checks"] if c["name"].startswith(prefix) and c["status"] == "fail"]


@pytest.mark.parametrize("test", ["psi:feature", "ks:feature", "mmd:embedding"])
def test_an_injected_shift_alerts_within_two_windows(reference, test):
    tracker = AlertTracker(SPEC.alerts.consecutive_windows)
    raised = []
    for seed in (101, 102):  # consecutive_windows = 2: the second shifted window must raise it
        raised += [e["name"] for e in tracker.update(window_report(window(reference, seed, 0.5), reference, SPEC))]
    assert any(name.startswith(test) for name in raised), raised


def test_unshifted_traffic_false_alarm_rate(reference):
    """Measured over 60 seeded windows of 500 records: a single window fails a test rarely (KS and MMD at their 1%
    level), and with 2 consecutive windows required no alert is raised at all."""
    tracker, fails, alerts = AlertTracker(2), {"psi": 0, "ks": 0, "mmd": 0}, []
    for seed in range(1000, 1060):
        report = window_report(window(reference, seed), reference, SPEC, seed)
        for test in fails:
            fails[test] += bool(failing(report, test))
        alerts += tracker.update(report)
    rates = {test: n / 60 for test, n in fails.items()}
    print("single-window false-fail rates over 60 windows:", rates)
    assert rates["psi"] == 0 and rates["ks"] <= 0.05 and rates["mmd"] <= 0.05, rates
    assert alerts == [], alerts


def test_embeddings_spread_finer_than_the_live_float16_rounding_drift_only_when_they_move():
    """Live windows keep embeddings in float16, whose rounding (2.4e-4 at 0.8) can be larger than the spread of a
    collapsed model's embeddings (here 64 dims spread by 1e-4 around 0.8). Judged against the float32 reference, the
    rounding alone would fail MMD; the reference is rounded the same way, so only a real move (here two rounding
    steps) fails."""
    rng = np.random.default_rng(0)

    def embeddings(n, shift=0.0):
        return (0.8 + shift + rng.normal(0.0, 1e-4, size=(n, 64))).astype(np.float32)

    ref = build_reference(embeddings=embeddings(250), probs=np.full((250, 2), 0.5), classes=["a", "b"])

    def mmd_status(shift):
        state = live_state(ref.bins())  # float16 samples, as replicas and the monitor keep them
        state.add_batch(["a"] * 200, samples={"embedding": embeddings(200, shift)})  # all kept: no random pick
        return {c.name: c.status for c in drift_checks(state, ref, SPEC.drift)}["mmd:embedding"]

    assert [mmd_status(0.0) for _ in range(5)] == ["ok"] * 5
    assert mmd_status(1e-3) == "fail"


def test_bias_checks_on_known_counts():
    spec = MonitorSpec.model_validate(
        {
            "bias": {
                "group": "g",
                "favourable": "1",
                "privileged": "a",
                "min_records_per_group": 50,
                "metrics": ["statistical_parity_difference", "disparate_impact_ratio", "equal_opportunity_difference"],
            }
        }
    )
    state = WindowState()
    for group, favourable in (("a", 50), ("b", 20)):
        for i in range(100):
            state.add("1" if i < favourable else "0", group, request_id=f"{group}{i}")
            state.add_feedback(f"{group}{i}", "1")  # every record's true label is favourable
    checks = {c.name: c for c in bias_checks(state, spec.bias)}
    assert checks["statistical_parity_difference"].value == pytest.approx(0.2 - 0.5)
    assert checks["disparate_impact_ratio"].value == pytest.approx(0.4)
    assert checks["equal_opportunity_difference"].value == pytest.approx(0.3)  # TPR 0.5 vs 0.2
    assert {c.status for c in checks.values()} == {"fail"}
    few = WindowState()
    for i in range(60):
        few.add("1", "a" if i < 40 else "b")
    assert {c.status for c in bias_checks(few, spec.bias)} == {"insufficient"}  # b has 20 < 50 records


def test_records_refused_as_invalid_are_judged_by_their_share_and_survive_merge_and_persistence():
    spec = MonitorSpec.model_validate({"max_invalid_rate": 0.02})
    clean, poisoned = WindowState(), WindowState()
    clean.add_batch(["1"] * 98)
    poisoned.invalid = 2
    assert "invalid_rate" not in {c["name"] for c in window_report(clean, None, spec)["checks"]}
    window = clean.merge(poisoned)
    assert (window.n, window.invalid) == (98, 2)
    (check,) = window_report(window, None, spec)["checks"]
    assert (check["name"], check["value"], check["status"]) == ("invalid_rate", 0.02, "ok")
    window.invalid += 1
    (check,) = window_report(window, None, spec)["checks"]
    assert check["status"] == "fail" and window_report(window, None, spec)["invalid_records"] == 3
    assert WindowState.from_dict(window.to_dict()).invalid == 3
    older = window.to_dict()
    del older["invalid"]
    assert WindowState.from_dict(older).invalid == 0


def test_alerts_need_consecutive_failures_and_recover_once():
    tracker = AlertTracker(2)

    def step(status):
        value = {"fail": 0.5, "ok": 0.05, "insufficient": None}[status]
        return tracker.update({"checks": [Check.judge("psi:x", "drift", value, 0.0, 0.2).to_dict()]})

    assert step("fail") == [] and step("insufficient") == []  # too few records neither breaks nor extends
    [alert] = step("fail")
    assert alert["event"] == "alert" and alert["windows"] == 2 and "psi:x" in tracker.open
    assert step("fail") == []  # still open: no second alert
    [recovered] = step("ok")
    assert recovered["event"] == "recovered" and tracker.open == {}


def predicted_classes(reference, counts, extra=0):
    """A window whose records are predicted as `counts` says (class -> records); `extra` records carry no class."""
    state = WindowState(reference.bins())
    classes = [c for c, n in counts.items() for _ in range(n)]
    state.add_batch(classes + ["neg"] * extra, categories={PREDICTED_CLASS: classes})
    return state


def test_chi_square_flags_a_shifted_class_distribution_and_passes_the_same_one(reference):
    ref_counts = reference.predictions["class"].counts  # neg, pos, other on the 2000 reference records
    shares = np.asarray(ref_counts) / sum(ref_counts)
    same = dict(zip(CLASSES, np.round(shares * 400).astype(int).tolist(), strict=True))
    shifted = {"neg": 250, "pos": 100, "other": 50}
    checks = {}
    for name, counts in (("same", same), ("shifted", shifted), ("unseen", {**same, "new": 20})):
        (checks[name],) = chi2_checks(predicted_classes(reference, counts), reference, SPEC.drift)
    assert checks["same"].name == "chi2:prediction.class" and checks["same"].status == "ok"
    assert checks["shifted"].status == "fail" and checks["unseen"].status == "fail"  # a class never seen in training
    # the p-value is scipy's on the 2 x k table (one categorical signal: the correction leaves it alone)
    table = [ref_counts, [shifted[c] for c in CLASSES]]
    assert checks["shifted"].value == pytest.approx(stats.chi2_contingency(table).pvalue, rel=1e-9)
    assert checks["same"].value > 0.5 and checks["shifted"].value < 1e-6
    # judged with the other drift checks of the window, and exported as a drift statistic
    drift = {c.name: c for c in drift_checks(predicted_classes(reference, shifted), reference, SPEC.drift)}
    assert drift["chi2:prediction.class"] == checks["shifted"] and drift["chi2:prediction.class"].kind == "drift"


def test_chi_square_is_insufficient_with_too_few_values_of_its_signal(reference):
    # 60 records (over the 50 drift needs) of which only 20 carry a predicted class: too few to test
    state = predicted_classes(reference, {"neg": 10, "pos": 10}, extra=40)
    (check,) = chi2_checks(state, reference, SPEC.drift)
    assert (check.name, check.value, check.status) == ("chi2:prediction.class", None, "insufficient")
    assert drift_checks(predicted_classes(reference, {"neg": 20}), reference, SPEC.drift) == []  # window too small
    tracker = AlertTracker(1)
    assert tracker.update({"checks": [check.to_dict()]}) == []


def labelled_window():
    """Known confusion counts, (group, label, predicted) -> records; group c has predictions and no label."""
    cells = {("a", "x", "x"): 2, ("a", "y", "y"): 1, ("a", "y", "x"): 1, ("b", "x", "y"): 1, ("b", "y", "y"): 2}
    state, i = WindowState(), 0
    for (group, label, predicted), count in cells.items():
        for _ in range(count):
            state.add(predicted, group, request_id=i)
            assert state.add_feedback(i, label)
            i += 1
    state.add_batch(["x"] * 5, ["c"] * 5)
    return state


def test_performance_per_group_from_known_confusion_counts():
    got = window_performance(labelled_window())
    # a: labels x x y y, predicted x x y x. recall x 2/2, y 1/2; F1 x 2*2/(2+3), y 2*1/(2+1)
    assert got["groups"]["a"] == pytest.approx(
        {"labelled": 4, "accuracy": 3 / 4, "recall": (1 + 1 / 2) / 2, "f1_macro": (4 / 5 + 2 / 3) / 2}
    )
    # b: labels x y y, predicted y y y. recall x 0/1, y 2/2; F1 x 0/(1+0), y 2*2/(2+3)
    assert got["groups"]["b"] == pytest.approx({"labelled": 3, "accuracy": 2 / 3, "recall": 1 / 2, "f1_macro": 2 / 5})
    assert got["groups"]["c"] == {"labelled": 0, "accuracy": None, "recall": None, "f1_macro": None}
    # all 7: hits x 2, y 3; labels x 3, y 4; predicted x 3, y 4
    assert got["overall"] == pytest.approx(
        {"labelled": 7, "accuracy": 5 / 7, "recall": (2 / 3 + 3 / 4) / 2, "f1_macro": (4 / 6 + 6 / 8) / 2}
    )


def test_performance_and_equalized_odds_are_judged_and_reported_per_window():
    spec = MonitorSpec.model_validate(
        {
            "bias": {
                "group": "g",
                "favourable": "x",
                "min_records_per_group": 3,
                "metrics": ["equalized_odds_difference"],
            },
            "performance": {"min_accuracy": 0.7, "min_f1_macro": 0.5, "min_labels": 4},
        }
    )
    report = json.loads(json.dumps(window_report(labelled_window(), None, spec)))  # JSON-ready
    assert report["performance"] == json.loads(json.dumps(window_performance(labelled_window())))
    checks = {c["name"]: (c["kind"], c["value"], c["status"]) for c in report["checks"]}
    # favourable x: a has TPR 2/2 and FPR 1/2, b TPR 0/1 and FPR 0/2; c, unlabelled, takes no part
    assert checks.pop("equalized_odds_difference") == ("bias", 1.0, "fail")
    assert checks == {
        "accuracy": ("performance", pytest.approx(5 / 7), "ok"),
        "f1_macro": ("performance", pytest.approx((4 / 6 + 6 / 8) / 2), "ok"),
        "accuracy:a": ("performance", 0.75, "ok"),
        "f1_macro:a": ("performance", pytest.approx((4 / 5 + 2 / 3) / 2), "ok"),
        "accuracy:b": ("performance", None, "insufficient"),  # 3 labels, under min_labels
        "f1_macro:b": ("performance", None, "insufficient"),
        "accuracy:c": ("performance", None, "insufficient"),
        "f1_macro:c": ("performance", None, "insufficient"),
    }
    strict = spec.performance.model_copy(update={"min_accuracy": 0.8, "min_labels": 1})
    failing = {c.name for c in performance_checks(report["performance"], strict) if c.status == "fail"}
    assert failing == {"accuracy", "accuracy:a", "accuracy:b", "f1_macro:b"}
    # equalized odds waits for labels, not predictions: 5 unlabelled predictions in a group do not make it judged
    unlabelled = WindowState()
    unlabelled.add_batch(["x"] * 10, ["a"] * 5 + ["b"] * 5)
    assert [c.status for c in bias_checks(unlabelled, spec.bias)] == ["insufficient"]


def test_a_performance_section_needs_a_minimum():
    with pytest.raises(ValueError, match="set at least one of min_accuracy"):
        MonitorSpec.model_validate({"performance": {"min_labels": 10}})
    with pytest.raises(ValueError, match="less than or equal to 1"):
        MonitorSpec.model_validate({"performance": {"min_recall": 1.5}})


def test_the_html_report_plots_and_tabulates_performance_from_late_labels(tmp_path):
    from steward.monitor.report import write_report

    spec = MonitorSpec.model_validate(
        {"bias": {"group": "g", "favourable": "x", "metrics": ["equalized_odds_difference"]}}
    )
    unlabelled = WindowState()
    unlabelled.add_batch(["x"] * 4, ["a"] * 4, t=1.0)
    history = [window_report(unlabelled, None, spec), window_report(labelled_window(), None, spec)]
    history[0].pop("performance")  # a window judged before performance was reported
    state = {"records": 11, "history": history, "alerts": {"open": {}}, "windows": {}}
    (tmp_path / "state.json").write_text(json.dumps(state))
    page = write_report(tmp_path).read_text()
    assert "Latest window with late labels" in page and "<td>b</td><td>3</td><td>0.6667</td>" in page
    assert (tmp_path / "performance.png").stat().st_size > 1000
