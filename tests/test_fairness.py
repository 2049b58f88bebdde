"""Fairness at training time without Ray: the per-group table against Fairlearn, the gate, mitigation maths."""

import numpy as np
import pytest
import yaml
from fairlearn.metrics import MetricFrame, false_positive_rate, selection_rate, true_positive_rate
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from steward.data import DataError
from steward.data.mitigate import positive_rates, resample, reweigh
from steward.evaluate.fairness import fairness_metrics, gate, group_table
from steward.evaluate.thresholds import Thresholds, adjust_logits, adjust_probabilities, choose_thresholds
from steward.runs import list_runs
from steward.spec import SpecError, load_job
from steward.spec.fairness import FairnessSpec


def predictions(n=600, seed=1):
    rng = np.random.default_rng(seed)
    groups = rng.choice(["a", "b", "c"], n, p=[0.5, 0.3, 0.2])
    y = rng.integers(0, 2, n)
    flip = rng.random(n) < np.where(groups == "b", 0.35, 0.15)
    return y, np.where(flip, 1 - y, y), groups


def test_per_group_table_matches_fairlearn_metric_frame():
    y, pred, groups = predictions()
    table = group_table(y, pred, groups, 1, FairnessSpec(bootstrap=100))
    frame = MetricFrame(
        metrics={
            "accuracy": accuracy_score,
            "precision": lambda t, p: precision_score(t, p, zero_division=0),
            "recall": recall_score,
            "f1": f1_score,
            "selection_rate": selection_rate,
            "tpr": true_positive_rate,
            "fpr": false_positive_rate,
        },
        y_true=y,
        y_pred=pred,
        sensitive_features=groups,
    )
    for group, row in frame.by_group.iterrows():
        for metric, expected in row.items():
            assert table[group][metric] == pytest.approx(expected, abs=1e-12), (group, metric)
            low, high = table[group][f"{metric}_ci"]
            assert low <= expected <= high and high - low < 0.3, (group, metric, low, high)


def test_fairness_metrics_and_the_gate():
    y, pred, groups = predictions()
    metrics = fairness_metrics(y, pred, groups, 1, privileged="a")
    from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

    assert metrics["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=groups), abs=1e-12
    )
    assert metrics["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y, pred, sensitive_features=groups), abs=1e-12
    )
    assert gate(metrics, {"demographic_parity_difference": 1.0, "disparate_impact_ratio": 0.0}) == []
    [problem] = gate(metrics, {"equalized_odds_difference": 0.01})
    assert problem.startswith("equalized_odds_difference = ") and "must be at most 0.01" in problem
    assert "must be at least 1.5" in gate(metrics, {"demographic_parity_ratio": 1.5})[0]


def test_reweighing_and_resampling_make_group_and_label_independent():
    rng = np.random.default_rng(0)
    groups = rng.choice(np.array(["a", "b"]), 2000)
    labels = (rng.random(2000) < np.where(groups == "a", 0.5, 0.2)).astype(int)
    assert positive_rates(labels, groups, 1)["gap"] > 0.25
    assert positive_rates(labels, groups, 1, reweigh(labels, groups))["gap"] < 1e-6
    rows = resample(labels, groups, seed=0)
    assert positive_rates(labels[rows], groups[rows], 1)["gap"] < 0.01 and abs(len(rows) - 2000) <= 4


def test_per_group_thresholds_reach_demographic_parity_and_apply_as_logit_shifts():
    rng = np.random.default_rng(2)
    groups = rng.choice(["a", "b"], 4000)
    p = np.clip(rng.beta(2, 2, 4000) - np.where(groups == "b", 0.2, 0.0), 0.001, 0.999)
    y = rng.random(4000) < p
    chosen = choose_thresholds(p, y, groups, "demographic_parity")
    rates = {g: float(np.mean(p[groups == g] >= chosen[g])) for g in ("a", "b")}
    assert (
        abs(rates["a"] - rates["b"]) < 0.01 < abs(np.mean(p[groups == "a"] >= 0.5) - np.mean(p[groups == "b"] >= 0.5))
    )
    thresholds = Thresholds("group", 1, "demographic_parity", chosen)
    probs = np.stack([1 - p, p], axis=1).astype(np.float32)
    decided = adjust_logits(np.log(probs), groups, thresholds).argmax(1)
    expected = p >= thresholds.of(groups)
    assert np.mean(decided == expected) > 0.999
    assert np.mean(adjust_probabilities(probs, groups, thresholds).argmax(1) == expected) > 0.999
    eo = choose_thresholds(p, y, groups, "equal_opportunity")
    tpr = {g: float(np.mean(p[(groups == g) & y] >= eo[g])) for g in ("a", "b")}
    assert abs(tpr["a"] - tpr["b"]) < 0.01


def write_job(tmp_path, **sections):
    data = {"source": "builtin:synthetic-text", "options": {"num_samples": 200}, **sections.pop("data", {})}
    raw = {"name": "f", "data": data, "model": {"family": "lstm"}, **sections}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "job.yaml"


@pytest.mark.parametrize(
    ("sections", "path", "fragment"),
    [
        ({"train": {"mitigation": {"method": "reweigh"}}}, "train.mitigation", "set data.group_columns"),
        (
            {"evaluate": {"fairness": {"thresholds": {"demographic_parity_difference": 0.1}}}},
            "evaluate.fairness.thresholds",
            "needs a group attribute",
        ),
        (
            {"data": {"group_columns": ["group"]}, "evaluate": {"fairness": {"group_column": "region"}}},
            "evaluate.fairness.group_column",
            "'region' is not one of data.group_columns",
        ),
        (
            {"data": {"group_columns": ["group"]}, "evaluate": {"fairness": {"thresholds": {"parity": 0.1}}}},
            "evaluate.fairness.thresholds.parity.[key]",
            "demographic_parity_difference",
        ),
        (
            {"data": {"group_columns": ["group"]}, "train": {"mitigation": {"method": "reweighing"}}},
            "train.mitigation.method",
            "'resample', 'reweigh' or 'thresholds'",
        ),
    ],
)
def test_bad_fairness_settings_name_the_field_and_the_fix(tmp_path, sections, path, fragment):
    with pytest.raises(SpecError) as err:
        load_job(write_job(tmp_path, **sections))
    assert any(p.path == path and fragment in p.message for p in err.value.problems), err.value.problems


def test_a_group_column_missing_from_the_data_fails_before_training(tmp_path):
    from steward.train.launch import prepare

    spec = load_job(
        write_job(tmp_path, data={"group_columns": ["region"]}, train={"mitigation": {"method": "reweigh"}})
    )
    with pytest.raises(DataError, match="data.group_columns: 'region' is not a column of builtin:synthetic-text"):
        prepare(spec, tmp_path)


def test_steward_runs_shows_the_fairness_gate(tmp_path):
    run = tmp_path / "fair" / "20260101-000000-abcd"
    run.mkdir(parents=True)
    (run / "status.json").write_text('{"state": "succeeded", "started": 1}')
    (run / "metrics.json").write_text('{"overall": {"accuracy": 0.9}, "fairness_gate": "failed"}')
    [summary] = list_runs(tmp_path)
    assert summary.headline == "accuracy=0.9000 fairness_gate=failed"
