"""Judging windows: detection of an injected shift within a stated number of windows, the measured false-alarm
rate on unshifted traffic, bias checks on known counts, and alert streaks."""

import numpy as np
import pytest

from steward.monitor.checks import AlertTracker, Check, bias_checks, drift_checks, live_state, window_report
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
