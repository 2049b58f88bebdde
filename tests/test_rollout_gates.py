"""Unit tier: the rollout's gates (steward.monitor.compare) over window reports shaped as the monitor writes them,
the routing replicas follow, and the serve.rollout section's checks."""

from pathlib import Path

import pytest

from steward.monitor.compare import ArmStats, judge_step
from steward.serve.rollout import Routing, load_state
from steward.spec import JobSpec
from steward.spec.load import SpecError, validate_job
from steward.spec.rollout import GatesSpec, RolloutSpec


def window(rates=None, n=100, checks=(), labels=None, end=10.0):
    """A closed window's report: favourable rates per group out of `n` records each, checks, late-label accuracy."""
    rates = rates or {"a": 0.5, "b": 0.5}
    performance = {"overall": {}, "groups": {}}
    if labels:
        performance["overall"] = {"labelled": labels[1], "accuracy": labels[0], "f1_macro": labels[0] - 0.1}
    return {
        "records": n * len(rates),
        "end": end,
        "checks": [dict(zip(("name", "kind", "value", "low", "high", "status"), c, strict=True)) for c in checks],
        "selection_rates": rates,
        "group_records": dict.fromkeys(rates, n),
        "performance": performance,
    }


def stats(requests=100, errors=0, latency=5.0, mirrored=0, agreed=0):
    return ArmStats(requests, errors, [latency] * requests, mirrored, agreed)


def judge(champion, challenger, new=None, gates=None, arm_stats=None, min_records=100):
    windows = {"champion": champion, "challenger": challenger}
    arm_stats = arm_stats or {"champion": stats(), "challenger": stats()}
    return judge_step(windows, challenger if new is None else new, arm_stats, gates or GatesSpec(), min_records)


def gate(judgement, name):
    return next(g for g in judgement.gates if g.gate == name)


SPD_FAIL = ("statistical_parity_difference", "bias", -0.35, -0.1, 0.1, "fail")
SPD_OK = ("statistical_parity_difference", "bias", -0.02, -0.1, 0.1, "ok")


def test_a_window_failing_a_bias_threshold_rolls_back_naming_metric_arm_groups_and_values():
    biased = window({"a": 0.6, "b": 0.25}, checks=[SPD_FAIL])
    judgement = judge([window()], [biased])
    assert judgement.decision == "rollback"
    failed = gate(judgement, "bias:statistical_parity_difference")
    assert failed.status == "fail" and failed.arm == "challenger" and failed.value == -0.35 and failed.limit == -0.1
    assert failed.detail["selection_rates"] == {"a": 0.6, "b": 0.25} and failed.detail["bounds"] == [-0.1, 0.1]


def test_enough_records_and_no_failing_gate_advance_too_few_hold():
    fair = window(checks=[SPD_OK])
    assert judge([window()], [fair]).decision == "advance"
    assert judge([window()], [fair], min_records=1000).decision == "hold"


def test_the_selection_rate_gap_fails_only_when_over_its_limit_beyond_chance():
    # 0.15 apart on 100 records a group: within chance of a 0.1 limit (the margin is ~0.12)
    close = judge([window({"a": 0.5, "b": 0.5})], [window({"a": 0.5, "b": 0.35})])
    assert gate(close, "selection_rate_gap").status == "ok" and close.decision == "advance"
    far = judge([window({"a": 0.5, "b": 0.5}, n=1000)], [window({"a": 0.5, "b": 0.2}, n=1000)])
    gap = gate(far, "selection_rate_gap")
    assert gap.status == "fail" and gap.detail["group"] == "b" and gap.value == pytest.approx(-0.3)
    assert far.decision == "rollback"
    # the champion's windows of the step are pooled: 3 windows of 100 weigh as 300 records
    pooled = judge([window({"a": 0.5, "b": 0.4}), window({"a": 0.5, "b": 0.6}), window()], [window()])
    assert gate(pooled, "selection_rate_gap").detail["champion"]["b"] == pytest.approx(0.5)


def test_drift_fails_the_challenger_only_where_the_champion_does_not_drift_too():
    psi = ("psi:prediction.class", "drift", 0.6, 0.0, 0.2, "fail")
    ks = ("ks:feature_1", "drift", 0.001, 0.01, 1.0, "fail")
    both = judge([window(checks=[psi])], [window(checks=[psi, ks])])
    verdicts = {g.gate: g for g in both.gates if g.gate.startswith("drift:")}
    assert verdicts["drift:psi:prediction.class"].status == "ok"  # the traffic moved for both arms
    assert verdicts["drift:ks:feature_1"].status == "fail" and verdicts["drift:ks:feature_1"].limit == 0.01
    assert both.decision == "rollback"


def test_error_rate_latency_and_agreement_compare_the_arms():
    worse = {"champion": stats(errors=1), "challenger": stats(errors=5, latency=20.0)}
    judgement = judge([window()], [window()], arm_stats=worse, gates=GatesSpec(max_latency_ratio=2.0))
    assert gate(judgement, "error_rate").status == "fail" and gate(judgement, "error_rate").value == pytest.approx(0.04)
    assert gate(judgement, "latency_p50").status == "fail" and gate(judgement, "latency_p50").value == 4.0
    reported = judge([window()], [window()], arm_stats={"champion": stats(), "challenger": stats(latency=20.0)})
    assert gate(reported, "latency_p50").status == "ok"  # no max_latency_ratio: reported, not gated
    shadow = {"champion": stats(), "challenger": stats(mirrored=200, agreed=150)}
    agreement = gate(judge([window()], [window()], arm_stats=shadow, gates=GatesSpec(min_agreement=0.9)), "agreement")
    assert agreement.status == "fail" and agreement.value == 0.75


def test_late_label_accuracy_and_f1_are_compared_once_both_arms_have_enough_labels():
    few = judge([window(labels=(0.9, 10))], [window(labels=(0.5, 10))])
    assert gate(few, "accuracy").status == "insufficient" and few.decision == "advance"
    enough = judge([window(labels=(0.9, 50))], [window(labels=(0.7, 40)), window(labels=(0.8, 40))])
    accuracy = gate(enough, "accuracy")
    assert accuracy.status == "fail" and accuracy.value == pytest.approx(0.9 - 0.75)
    assert not any(g.gate.startswith("f1_macro") for g in enough.gates)  # max_f1_drop off by default
    f1 = gate(
        judge([window(labels=(0.9, 50))], [window(labels=(0.86, 50))], gates=GatesSpec(max_f1_drop=0.02)), "f1_macro"
    )
    assert f1.status == "fail" and f1.value == pytest.approx(0.04)


def test_arm_stats_merge_and_keep_a_bounded_latency_sample():
    total = ArmStats()
    for _ in range(3):
        total.add(ArmStats(4000, 4, [1.0] * 4000))
    assert total.requests == 12000 and total.errors == 12 and len(total.latency_ms) == 5000
    assert total.error_rate == pytest.approx(0.001) and total.p50_ms == 1.0 and ArmStats().p50_ms is None


@pytest.mark.parametrize(
    ("routing", "draw", "answers", "mirrors"),
    [
        (Routing("canary", "running", 0.25), 0.1, "challenger", False),
        (Routing("canary", "running", 0.25), 0.3, "champion", False),
        (Routing("canary", "rolled_back", 0.0), 0.0, "champion", False),
        (Routing("canary", "promoted", 1.0), 0.99, "challenger", False),
        (Routing("shadow", "running", 0.5), 0.1, "champion", True),
        (Routing("shadow", "aborted", 0.0), 0.1, "champion", False),
    ],
)
def test_routing(routing, draw, answers, mirrors):
    assert routing.answers(draw) == answers and routing.mirrors(draw) == mirrors


BASE = {
    "name": "r",
    "data": {"source": "builtin:synthetic-text", "group_columns": ["group"]},
    "model": {"family": "transformer"},
    "serve": {"rollout": {}},
    "monitor": {"bias": {"group": "group", "favourable": "1", "privileged": "a"}},
}


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"serve": {"rollout": {"steps": [0.5, 0.25]}}}, "serve.rollout.steps", "must increase"),
        ({"serve": {"rollout": {"steps": [0.0]}}}, "serve.rollout.steps", "greater than 0"),
        ({"serve": {"rollout": {"mode": "blue-green"}}}, "serve.rollout.mode", "shadow"),
        ({"serve": {"rollout": {"sticky_header": "x client"}}}, "serve.rollout.sticky_header", "pattern"),
        ({"monitor": None}, "serve.rollout", "add a monitor section"),
        ({"monitor": {}}, "serve.rollout.gates.max_selection_rate_gap", "needs monitor.bias"),
    ],
)
def test_bad_rollout_sections_are_refused_by_field(change, field, words):
    with pytest.raises(SpecError) as err:
        validate_job(BASE | change, "spec.yaml", Path("."))
    assert field in str(err.value) and words in str(err.value), str(err.value)


def test_a_language_model_rollout_is_refused_and_a_good_section_fills_its_defaults():
    lm = BASE | {"model": {"family": "transformer", "task": "causal_lm", "params": {"model_type": "gpt2"}}}
    lm = lm | {"monitor": None, "data": {"source": "builtin:synthetic-text"}}
    with pytest.raises(SpecError) as err:
        validate_job(lm, "spec.yaml", Path("."))
    assert "serve.rollout" in str(err.value) and "classification" in str(err.value)
    spec = JobSpec.model_validate(BASE)
    rollout = spec.serve.rollout
    assert isinstance(rollout, RolloutSpec) and rollout.mode == "canary" and rollout.steps == [0.1, 0.25, 0.5]


def test_a_rollout_state_file_that_cannot_be_read_is_named_not_guessed(tmp_path):
    path = tmp_path / "state.json"
    state, problem = load_state(path)
    assert problem is None and state.state == "running" and state.step == 0
    path.write_text(
        '{"state": {"state": "promoted", "step": 1, "step_started": 1.0, "judged_until": 0.0, "decisions": []}}'
    )
    state, problem = load_state(path)
    assert problem is None and state.state == "promoted" and state.step == 1
    for text in (
        "{not json",
        '{"state": {"step": 1, "hacked": true}}',
        '{"state": {"state": "owned", "step": -1}}',
        "[]",
    ):
        path.write_text(text)
        state, problem = load_state(path)
        assert problem is not None and str(path) in problem and state.step == 0, text
