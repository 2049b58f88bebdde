"""Bias metrics against Fairlearn and AIF360 on the same seeded data, to 1e-12, plus the edge-case conventions."""

import logging
import math
import warnings

import fairlearn.metrics as fl
import numpy as np
import pandas as pd
import pytest

from steward.monitor import bias

logging.getLogger().setLevel(logging.ERROR)  # aif360 logs missing optional extras (tensorflow, ...) at import
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from aif360.datasets import BinaryLabelDataset
    from aif360.metrics import BinaryLabelDatasetMetric

TOL = 1e-12
SEEDS = range(150)

# Fairlearn's documented example (user guide, "Fairness metrics")
FL_TRUE = [0, 1, 1, 1, 1, 0, 1, 0, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1]
FL_PRED = [0, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 0]
FL_GROUPS = list("bbabbcccaacabccbcc")


def random_case(seed: int):
    """Multiclass labels and predictions over 1-5 groups; about a third of cases force a group with no positives
    (and so no TPR), some a group with no negatives."""
    rng = np.random.default_rng(seed)
    n, n_groups, n_classes = int(rng.integers(2, 80)), int(rng.integers(1, 6)), int(rng.integers(2, 5))
    groups = rng.choice([f"g{i}" for i in range(n_groups)], n)
    y_true, y_pred = rng.integers(0, n_classes, n), rng.integers(0, n_classes, n)
    positive = int(rng.integers(0, n_classes))
    if seed % 3 == 0:
        y_true[groups == groups[0]] = (positive + 1) % n_classes  # groups[0]'s group has no actual positives
    if seed % 5 == 0:
        y_true[groups == groups[-1]] = positive  # and (maybe another) group with no actual negatives
    return y_true, y_pred, groups, positive


def aif360_metric(y_pred, groups, privileged, positive):
    """AIF360's dataset metric on the predictions (as labels): pooled privileged vs pooled unprivileged."""
    codes = {g: i for i, g in enumerate(sorted(set(groups)))}
    df = pd.DataFrame({"y": (np.asarray(y_pred) == positive).astype(float), "g": [float(codes[g]) for g in groups]})
    ds = BinaryLabelDataset(
        df=df, label_names=["y"], protected_attribute_names=["g"], favorable_label=1.0, unfavorable_label=0.0
    )
    priv = [{"g": float(codes[p])} for p in privileged]
    unpriv = [{"g": float(c)} for g, c in codes.items() if g not in privileged]
    return BinaryLabelDatasetMetric(ds, privileged_groups=priv, unprivileged_groups=unpriv)


def test_fairlearn_worked_example():
    assert bias.demographic_parity_difference(FL_PRED, FL_GROUPS) == pytest.approx(0.25, abs=TOL)
    assert bias.equalized_odds_difference(FL_TRUE, FL_PRED, FL_GROUPS) == pytest.approx(1.0, abs=TOL)
    assert bias.selection_rates(FL_PRED, FL_GROUPS) == {"a": 0.75, "b": 0.5, "c": 0.5}


@pytest.mark.parametrize("seed", SEEDS)
def test_against_fairlearn(seed):
    y_true, y_pred, groups, positive = random_case(seed)
    t, p = (y_true == positive).astype(int), (y_pred == positive).astype(int)  # one-vs-rest, as given to Fairlearn
    frame = fl.MetricFrame(metrics=fl.selection_rate, y_true=t, y_pred=p, sensitive_features=groups)
    ours = bias.selection_rates(y_pred, groups, positive)
    assert set(ours) == set(frame.by_group.index)
    assert all(abs(ours[g] - frame.by_group[g]) <= TOL for g in ours)
    checks = {
        "dpd": (
            bias.demographic_parity_difference(y_pred, groups, positive),
            fl.demographic_parity_difference(t, p, sensitive_features=groups),
        ),
        "dpr": (
            bias.demographic_parity_ratio(y_pred, groups, positive),
            fl.demographic_parity_ratio(t, p, sensitive_features=groups),
        ),
        "eod": (
            bias.equalized_odds_difference(y_true, y_pred, groups, positive),
            fl.equalized_odds_difference(t, p, sensitive_features=groups),
        ),
        "eopp": (
            bias.equal_opportunity_difference(y_true, y_pred, groups, positive),
            fl.equal_opportunity_difference(t, p, sensitive_features=groups),
        ),
    }
    for name, (mine, theirs) in checks.items():
        assert (math.isnan(mine) and math.isnan(theirs)) or abs(mine - theirs) <= TOL, (name, mine, theirs)


@pytest.mark.parametrize("seed", SEEDS)
def test_against_aif360(seed):
    _, y_pred, groups, positive = random_case(seed)
    names = sorted(set(groups.tolist()))
    if len(names) < 2:
        return  # signed metrics need an unprivileged side (covered by test_signed_metrics_need_both_sides)
    rng = np.random.default_rng(1000 + seed)
    privileged = list(rng.choice(names, int(rng.integers(1, len(names))), replace=False))
    metric = aif360_metric(y_pred, groups, privileged, positive)
    with np.errstate(divide="ignore", invalid="ignore"):
        spd, di = metric.statistical_parity_difference(), metric.disparate_impact()
    assert abs(bias.statistical_parity_difference(y_pred, groups, privileged, positive) - spd) <= TOL
    ours = bias.disparate_impact_ratio(y_pred, groups, privileged, positive)
    assert (math.isnan(ours) and math.isnan(di)) or ours == di or abs(ours - di) <= TOL, (ours, di)


def test_group_without_positives_counts_as_zero_tpr_like_fairlearn():
    y_true = [1, 1, 0, 0, 0, 0]
    y_pred = [1, 0, 0, 1, 0, 0]
    groups = ["a", "a", "b", "b", "c", "c"]  # b and c have no actual positives: TPR undefined
    # a: TPR 0.5, FPR undefined; b: FPR 0.5; c: FPR 0
    assert bias.equal_opportunity_difference(y_true, y_pred, groups) == 0.5  # 0.5 - 0 (b, c as 0)
    assert bias.equalized_odds_difference(y_true, y_pred, groups) == 0.5
    assert fl.equalized_odds_difference(y_true, y_pred, sensitive_features=groups) == 0.5
    # skipping undefined rates: only a has a TPR, so no TPR gap; FPR gap over b, c is 0.5
    assert bias.equal_opportunity_difference(y_true, y_pred, groups, undefined="skip") == 0.0
    assert bias.equalized_odds_difference(y_true, y_pred, groups, undefined="skip") == 0.5
    assert math.isnan(bias.equal_opportunity_difference([0, 0], [1, 0], ["a", "b"], undefined="skip"))


def test_single_group_and_zero_rates():
    assert bias.demographic_parity_difference([1, 0, 1], ["a"] * 3) == 0.0
    assert bias.demographic_parity_ratio([1, 0, 1], ["a"] * 3) == 1.0
    assert math.isnan(bias.demographic_parity_ratio([0, 0, 0], ["a", "b", "b"]))  # Fairlearn's 0/0
    assert bias.disparate_impact_ratio([1, 0, 0], ["u", "p", "p"], privileged="p") == math.inf  # AIF360: x/0
    assert math.isnan(bias.disparate_impact_ratio([0, 0, 0], ["u", "p", "p"], privileged="p"))


def test_signed_metrics_pool_groups_and_keep_sign():
    y_pred = [1, 1, 0, 0, 1, 0, 0, 0]
    groups = ["p", "p", "p", "p", "u1", "u1", "u2", "u2"]
    # privileged 2/4 = 0.5, pooled unprivileged 1/4 = 0.25
    assert bias.statistical_parity_difference(y_pred, groups, privileged="p") == -0.25
    assert bias.disparate_impact_ratio(y_pred, groups, privileged="p") == 0.5
    assert bias.statistical_parity_difference(y_pred, groups, privileged=["u1", "u2"]) == 0.25


def test_signed_metrics_need_both_sides():
    with pytest.raises(ValueError, match="no unprivileged records"):
        bias.statistical_parity_difference([1, 0], ["p", "p"], privileged="p")
    only_labels = {"p": bias.GroupCounts(tp=1), "u": bias.GroupCounts(n=2, selected=1)}  # p seen only via a label
    with pytest.raises(ValueError, match="no privileged records"):
        bias.statistical_parity_difference_from_counts(only_labels, "p")
    with pytest.raises(ValueError, match="`privileged`.*not found"):
        bias.disparate_impact_ratio([1, 0], ["a", "b"], privileged="z")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bias.selection_rates([], []), "`y_pred` is empty"),
        (lambda: bias.selection_rates([1, 0], ["a"]), "same length"),
        (lambda: bias.demographic_parity_difference([1, 0], [np.nan, 1.0]), "`groups` contains NaN"),
        (lambda: bias.equalized_odds_difference([], [1], ["a"]), "`y_true` is empty"),
        (lambda: bias.selection_rates([[1]], ["a"]), "`y_pred` must be one-dimensional"),
        (lambda: bias.equal_opportunity_difference([1], [1], ["a"], undefined="nan"), "`undefined`"),
    ],
)
def test_invalid_input_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_counts_path_equals_array_path():
    """The window's per-group counts feed the same *_from_counts functions as the array API."""
    y_true, y_pred, groups, positive = random_case(7)
    counts = bias.group_counts(y_pred, groups, positive, y_true)
    assert sum(c.n for c in counts.values()) == len(y_pred)
    assert bias.equalized_odds_difference_from_counts(counts) == bias.equalized_odds_difference(
        y_true, y_pred, groups, positive
    )
