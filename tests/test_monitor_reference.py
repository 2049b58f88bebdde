"""Reference profile: each part against numpy and `bias` directly, save/load round trip, live windows on its bins."""

import json
import math

import numpy as np
import pytest

from steward.monitor import bias, drift
from steward.monitor.reference import (
    CONFIDENCE,
    PREDICTED_CLASS,
    QUANTILES,
    build_reference,
    feature_profile,
    feature_profiles,
    group_rates,
    load_reference,
    prediction_profile,
    reservoir_sample,
    save_reference,
    text_statistics,
)
from steward.monitor.window_state import WindowState


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@pytest.fixture
def validation():
    rng = np.random.default_rng(0)
    n = 400
    return {
        "x": rng.normal(size=(n, 5)),
        "emb": rng.normal(size=(n, 8)),
        "probs": softmax(rng.normal(size=(n, 3)) * 2),
        "y_true": rng.integers(0, 3, n),
        "groups": rng.choice(["a", "b"], n),
        "tokens": [rng.integers(0, 50, int(rng.integers(1, 20))).tolist() for _ in range(n)],
    }


def test_numeric_profile_matches_numpy():
    values = np.random.default_rng(1).gamma(2.0, size=1000)
    values[:7] = np.nan
    prof = feature_profile(values, "v")
    present = values[7:]
    edges = drift.quantile_edges(present)
    assert prof.edges == edges.tolist() and prof.counts == drift.bin_counts(present, edges).tolist()
    assert prof.n == 993 and prof.missing == 7 and sum(prof.counts) == 993
    assert prof.quantiles == {str(q): v for q, v in zip(QUANTILES, np.quantile(present, QUANTILES), strict=True)}
    cat = feature_profile(np.array(["b", "a", "b"]), "c")
    assert (cat.kind, cat.categories, cat.counts) == ("categorical", ["a", "b"], [1, 2])


def test_sequence_features_pool_time_steps():
    x = np.arange(24, dtype=float).reshape(2, 3, 4)  # 2 sequences, 3 steps, 4 features
    profs = feature_profiles(x, sequence=True)
    assert list(profs) == ["x0", "x1", "x2", "x3"] and all(p.n == 6 for p in profs.values())
    assert profs["x0"].quantiles["0.5"] == np.median(x[:, :, 0])
    assert len(feature_profiles(np.zeros((5, 8, 8)))) == 64  # images: pixels flattened
    with pytest.raises(ValueError, match="`names` must be 4 distinct"):
        feature_profiles(np.zeros((3, 4)), names=["a", "a", "b", "c"])


def test_reservoir_sample_is_a_subset_without_replacement():
    rows = np.arange(2000, dtype=float).reshape(1000, 2)
    sample = reservoir_sample(rows, 100, seed=3)
    assert sample.shape == (100, 2) and len(np.unique(sample[:, 0])) == 100
    assert set(sample[:, 0]) <= set(rows[:, 0]) and (sample[:, 1] == sample[:, 0] + 1).all()
    assert reservoir_sample(rows[:10], 100).shape == (10, 2)


def test_text_statistics_by_hand():
    stats = text_statistics([[5, 1, 1, 0, 0], [1, 0, 0, 0, 0], [7, 8, 9, 0, 0]], unk_id=1, pad_id=0)
    assert stats["unk_token_rate"] == 3 / 7  # 3 unknown tokens among 3 + 1 + 3 non-padding ones
    assert stats["length"].quantiles["0.5"] == 3.0
    assert stats["unk_rate"].n == 3 and stats["unk_rate"].quantiles["0.99"] == pytest.approx(1.0 - 0.02 * (1 - 2 / 3))


def test_prediction_profile_and_group_rates(validation):
    probs = validation["probs"]
    pred = prediction_profile(probs, classes=["cat", "dog", "eel"])
    assert pred["class"].counts == np.bincount(probs.argmax(1), minlength=3).tolist()
    assert pred["class"].categories == ["cat", "dog", "eel"]
    assert pred["confidence"].quantiles["0.5"] == np.median(probs.max(1))
    rates = group_rates(validation["y_true"], probs.argmax(1), validation["groups"], positive=2)
    expected = bias.selection_rates(probs.argmax(1), validation["groups"], 2)
    assert {k: v["selection_rate"] for k, v in rates.items()} == expected
    counts = bias.group_counts(probs.argmax(1), validation["groups"], 2, validation["y_true"])
    assert rates["a"]["tpr"] == counts["a"].tpr and rates["b"]["error_rate"] == counts["b"].error_rate


def test_save_load_round_trip(validation, tmp_path):
    ref = build_reference(
        validation["x"],
        [f"f{i}" for i in range(5)],
        embeddings=validation["emb"],
        probs=validation["probs"],
        token_ids=validation["tokens"],
        unk_id=1,
        y_true=validation["y_true"],
        groups=validation["groups"],
        positive=1,
        sample_size=100,
        meta={"run": "r1"},
    )
    ref.groups["a"]["tpr"] = math.nan  # as for a group without positives
    path = save_reference(ref, tmp_path / "ref")
    json.loads(path.read_text())  # strict JSON: NaN was written as null
    back = load_reference(tmp_path / "ref")
    assert back.features == ref.features and back.predictions == ref.predictions and back.text == ref.text
    assert math.isnan(back.groups["a"]["tpr"]) and back.groups["b"] == ref.groups["b"] and back.meta == ref.meta
    assert set(back.samples) == {"features", "embedding"}
    assert all((back.samples[k] == ref.samples[k]).all() for k in ref.samples)
    assert back.samples["embedding"].shape == (100, 8) and back.bins() == ref.bins()
    with pytest.raises(FileNotFoundError, match="no reference profile"):
        load_reference(tmp_path / "missing")


def test_reference_checks_its_inputs():
    with pytest.raises(ValueError, match="reserved"):
        build_reference(np.zeros((3, 1)), [CONFIDENCE])
    with pytest.raises(ValueError, match="`unk_id` is required"):
        build_reference(token_ids=[[1, 2]])
    with pytest.raises(ValueError, match="no non-missing values"):
        feature_profile([np.nan, np.nan], "v")


def test_validation_traffic_replayed_through_a_window_shows_no_drift(validation):
    """Live records counted on the reference's bins reproduce the reference histograms exactly: PSI 0."""
    ref = build_reference(validation["x"], [f"f{i}" for i in range(5)], probs=validation["probs"])
    bins = ref.bins()
    assert bins.names == [*(f"f{i}" for i in range(5)), CONFIDENCE] and list(bins.categorical) == [PREDICTED_CLASS]
    state = WindowState(bins)
    for x, p in zip(validation["x"], validation["probs"], strict=True):
        state.add(int(p.argmax()), features=[*x, p.max()], categories={PREDICTED_CLASS: int(p.argmax())})
    for name, prof in ref.signals().items():
        live = state.histogram(name)
        live = live[:-1] if prof.kind == "categorical" else live  # drop the unseen-category cell (empty here)
        assert live.tolist() == prof.counts, name
        assert drift.psi(prof.counts, live, kind="counts") == 0.0
