"""Window state: exact merges across replicas (late labels included), persistence, windows by count and time,
and reservoir uniformity (a chi-squared check that can fail, and does fail for a naive merge)."""

import json
import pickle

import numpy as np
import pytest
from scipy import stats

from steward.monitor import bias
from steward.monitor.bins import Bins
from steward.monitor.checks import MMD_POINTS, live_state
from steward.monitor.drift import bin_counts, quantile_edges
from steward.monitor.performance import window_performance
from steward.monitor.reservoir import Reservoir, SampleSpec
from steward.monitor.window_state import WindowState
from steward.monitor.windowing import Windows

N_FEATURES = 3


def make_bins(seed: int = 0) -> Bins:
    ref = np.random.default_rng(seed).normal(size=(1000, N_FEATURES))
    return Bins({f"x{i}": quantile_edges(ref[:, i]) for i in range(N_FEATURES)}, {"colour": ["red", "green"]})


def random_stream(seed: int, n: int = 600):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.3, 1.2, size=(n, N_FEATURES))
    x[rng.random(x.shape) < 0.02] = np.nan  # some missing values
    return {
        "x": x,
        "groups": rng.choice(["a", "b", "c"], n),
        "y_pred": rng.integers(0, 3, n),
        "y_true": rng.integers(0, 3, n),
        "colour": rng.choice(["red", "green", "blue"], n),  # blue: unseen at reference time
        "emb": rng.normal(size=(n, 4)),
        "labelled": rng.random(n) < 0.7,  # 30% of labels never arrive
    }


def feed_replicas(data, n_replicas: int, seed: int, bins: Bins) -> list[WindowState]:
    """Records go to random replicas; each label goes to a random replica, usually not the one that predicted."""
    rng = np.random.default_rng(seed)
    states = [WindowState(bins, reservoir_capacity=50) for _ in range(n_replicas)]
    for i in range(len(data["y_pred"])):
        states[rng.integers(n_replicas)].add(
            data["y_pred"][i],
            data["groups"][i],
            data["x"][i],
            {"colour": data["colour"][i]},
            {"emb": data["emb"][i]},
            request_id=f"r{i}",
            t=float(i),
        )
    for i in rng.permutation(len(data["y_pred"])):
        if data["labelled"][i]:
            states[rng.integers(n_replicas)].add_feedback(f"r{i}", data["y_true"][i])
    return states


def assert_same_counts(a: WindowState, b: WindowState) -> None:
    assert a.n == b.n and a.predicted == b.predicted and a.confusion == b.confusion
    assert (a.histograms == b.histograms).all() and all(
        (a.categorical[k] == b.categorical[k]).all() for k in a.categorical
    )
    assert a.pending_predictions == b.pending_predictions and a.pending_labels == b.pending_labels
    assert (a.start, a.end) == (b.start, b.end)
    assert {k: r.seen for k, r in a.reservoirs.items()} == {k: r.seen for k, r in b.reservoirs.items()}


@pytest.mark.parametrize("seed", range(10))
def test_merge_is_exact_and_order_free(seed):
    data, bins = random_stream(seed), make_bins()
    s1, s2, s3 = feed_replicas(data, 3, seed, bins)
    (single,) = feed_replicas(data, 1, seed, bins)
    left, right, other = s1.merge(s2).merge(s3), s1.merge(s2.merge(s3)), s3.merge(s1).merge(s2)
    for merged in (left, right, other):
        assert_same_counts(merged, single)
    # against the arrays: group counts (labelled records only in the confusion cells), histograms on the bins
    lab = data["labelled"]
    for positive in range(3):
        expected = bias.group_counts(data["y_pred"], data["groups"], positive)
        labelled = bias.group_counts(data["y_pred"][lab], data["groups"][lab], positive, data["y_true"][lab])
        got = left.group_counts(positive)
        for g in expected:
            assert (got[g].n, got[g].selected) == (expected[g].n, expected[g].selected)
            assert got[g].as_tuple()[2:] == labelled[g].as_tuple()[2:]
    for i, name in enumerate(bins.names):
        col = data["x"][:, i]
        assert (left.histogram(name) == bin_counts(col[~np.isnan(col)], bins.numeric[name])).all()
        assert left.histograms[i, bins.missing_column] == np.isnan(col).sum()
    assert left.histogram("colour").tolist() == [sum(data["colour"] == c) for c in ("red", "green", "blue")]
    assert left.pending_labels == {} and len(left.pending_predictions) == (~lab).sum()


@pytest.mark.parametrize("seed", range(3))
def test_performance_of_merged_replicas_equals_sklearn_on_the_labelled_records(seed):
    """Labels reach other replicas than their predictions; merged, each group's accuracy, macro recall and macro F1
    are scikit-learn's (evaluate's metrics) on that group's labelled records, and so are the overall ones."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    data = random_stream(seed)
    s1, s2, s3 = feed_replicas(data, 3, seed, make_bins())
    got, lab = window_performance(s1.merge(s2).merge(s3)), data["labelled"]

    def oracle(rows):
        y, p = data["y_true"][rows], data["y_pred"][rows]
        return {
            "labelled": int(rows.sum()),
            "accuracy": accuracy_score(y, p),
            "recall": recall_score(y, p, average="macro", zero_division=0),
            "f1_macro": f1_score(y, p, average="macro", zero_division=0),
        }

    assert got["overall"] == pytest.approx(oracle(lab), abs=1e-12)
    assert sorted(got["groups"]) == ["a", "b", "c"]
    for group, scores in got["groups"].items():
        assert scores == pytest.approx(oracle(lab & (data["groups"] == group)), abs=1e-12), group


@pytest.mark.parametrize("seed", range(3))
def test_update_in_place_equals_merge_and_leaves_the_delta_alone(seed):
    data, bins = random_stream(seed), make_bins()
    s1, s2, s3 = feed_replicas(data, 3, seed, bins)
    expected = s1.merge(s2).merge(s3)
    before = s2.to_dict()
    running = s1.copy()
    assert running.update(s2).update(s3) is running
    assert_same_counts(running, expected)
    assert s2.to_dict() == before and running.reservoirs["emb"] is not s2.reservoirs["emb"]


@pytest.mark.parametrize("max_pending", [3, 5, 1000])
@pytest.mark.parametrize("waiting_label", [6, 99])  # 6: a label waits for an id of the batch; 99: none does
def test_add_batch_pending_equals_single_adds_at_the_cap(max_pending, waiting_label):
    """Repeated ids, ids already pending, labels waiting for some ids, and a cap that evicts mid-batch: the batch
    path must leave the same pending maps, confusion counts and eviction count as adding one by one."""
    ids = [1, 2, 3, 2, 4, 5, 6, 1, 7]
    one, batch = WindowState(max_pending=max_pending), WindowState(max_pending=max_pending)
    for state in (one, batch):
        state.add(0, "a", request_id=2)
        state.add_feedback(waiting_label, 1)
    for i, rid in enumerate(ids):
        one.add(i % 2, "b", request_id=rid)
    batch.add_batch([i % 2 for i in range(len(ids))], ["b"] * len(ids), request_ids=ids)
    assert one.pending_predictions == batch.pending_predictions and list(one.pending_predictions) == list(
        batch.pending_predictions
    )
    assert (one.pending_labels, one.confusion, one.evicted) == (batch.pending_labels, batch.confusion, batch.evicted)
    unique = WindowState(max_pending=4)  # the bulk path: fresh ids only, evicting mid-batch
    unique.add_batch([0] * 6, request_ids=range(6))
    assert list(unique.pending_predictions) == [2, 3, 4, 5] and unique.evicted == 2


def test_json_round_trip_then_merge():
    data, bins = random_stream(3), make_bins()
    s1, s2 = feed_replicas(data, 2, 3, bins)
    restored = WindowState.from_dict(json.loads(json.dumps(s1.to_dict())))
    assert restored.to_dict() == s1.to_dict()
    assert_same_counts(restored.merge(s2), s1.merge(s2))
    by_row = {
        **s1.to_dict(),
        "pending_predictions": [[r, g, p] for r, (g, p) in s1.pending_predictions.items()],
        "pending_labels": [[r, y] for r, y in s1.pending_labels.items()],
    }
    assert s1.pending_predictions and s1.pending_labels  # states saved by row (before columns) still load
    assert_same_counts(WindowState.from_dict(by_row), s1)
    with pytest.raises(ValueError, match="version"):
        WindowState.from_dict({**s1.to_dict(), "version": 99})


def test_add_batch_equals_single_adds():
    data, bins = random_stream(4), make_bins()
    one, batch = WindowState(bins), WindowState(bins)
    n = len(data["y_pred"])
    for i in range(n):
        one.add(
            data["y_pred"][i], data["groups"][i], data["x"][i], {"colour": data["colour"][i]}, request_id=i, t=1.0 + i
        )
    batch.add_batch(
        data["y_pred"],
        data["groups"],
        data["x"],
        t=(1.0, float(n)),
        categories={"colour": data["colour"]},
        request_ids=range(n),
    )
    assert one.predicted == batch.predicted and (one.histograms == batch.histograms).all()
    assert (one.categorical["colour"] == batch.categorical["colour"]).all() and one.n == batch.n == n
    assert one.pending_predictions == batch.pending_predictions and (one.start, one.end) == (batch.start, batch.end)
    for state in (one, batch):  # a late label finds its prediction either way
        assert state.add_feedback(3, data["y_pred"][3])


def test_merge_refuses_other_bins_and_pending_is_bounded():
    with pytest.raises(ValueError, match="different reference bins"):
        WindowState(make_bins(0)).merge(WindowState(make_bins(1)))
    state = WindowState(max_pending=5)
    for i in range(8):
        state.add(1, "a", request_id=i)
    assert len(state.pending_predictions) == 5 and state.evicted == 3
    assert not state.add_feedback(0, 1)  # evicted: the label waits instead
    assert state.add_feedback(7, 1) and state.group_counts(1)["a"].tp == 1


def test_count_windows_slide_by_panes_and_carry_late_labels():
    windows = Windows(WindowState, size=300, step=100)
    closed = []
    for i in range(1000):
        closed += windows.add(t=0.0, prediction=i // 100, group="g", request_id=i)
        if i == 450:
            windows.add_feedback(5, 0)  # label for a record of pane 0, arriving in pane 4
    # a window closes at every pane from the third on: panes 0-2, 1-3, ..., 7-9
    assert [w.n for w in closed] == [300] * 8
    assert [sorted(w.class_counts()) for w in closed[:2]] == [[0, 1, 2], [1, 2, 3]]
    labelled = [sum(w.confusion.values()) for w in closed]
    assert labelled == [0, 0, 1, 1, 1, 0, 0, 0]  # counted in pane 4 (where it arrived): windows 2-4, 3-5, 4-6
    assert windows.current().n == 200  # panes 8, 9 (still in range) + the empty open pane


def test_time_windows_align_to_step_and_bound_idle_gaps():
    windows = Windows(WindowState, size=10.0, step=5.0, by="time")
    closed = []
    for t in np.arange(100.0, 131.0, 0.5):  # two records a second from t=100
        closed += windows.add(t=float(t), prediction=1)
    # panes [100,105), [105,110), ...; windows of two panes close at t=110, 115, 120, 125, 130
    assert [(w.start, w.end) for w in closed] == [(100.0 + 5 * k, 109.5 + 5 * k) for k in range(5)]
    assert all(w.n == 20 for w in closed)
    idle = windows.add(t=1e6, prediction=1)  # a long idle gap emits at most size/step + 1 windows
    assert len(idle) == 3 and idle[-1].n == 0
    with pytest.raises(ValueError, match="whole number of steps"):
        Windows(WindowState, size=10, step=3)


def inclusion_pvalue(reservoirs: list[Reservoir], n_items: int) -> float:
    """Chi-squared goodness of fit of per-item inclusion counts to uniform (each item kept with capacity / n)."""
    counts = np.bincount(np.concatenate([r.sample[:, 0].astype(int) for r in reservoirs]), minlength=n_items)
    return float(stats.chisquare(counts).pvalue)


def stream(capacity: int, items: range, seed: int) -> Reservoir:
    r = Reservoir(capacity, 1, seed=seed)
    for i in items:
        r.add([i])
    return r


def test_reservoir_is_uniform_within_and_across_merges():
    trials, cap = 2000, 10
    single = [stream(cap, range(50), s) for s in range(trials)]
    assert inclusion_pvalue(single, 50) > 1e-3
    # uneven replicas (10 vs 40 items) merged, then the stream continues with 10 more items
    merged = []
    for s in range(trials):
        m = stream(cap, range(10), s).merge(stream(cap, range(10, 50), s + 10**6))
        for i in range(50, 60):
            m.add([i])
        merged.append(m)
    assert all(m.seen == 60 and len(m.sample) == cap for m in merged)
    assert inclusion_pvalue(merged, 60) > 1e-3


def test_merging_a_larger_reservoir_gives_a_uniform_sample_at_the_smaller_capacity():
    """A state saved before live windows kept fewer embeddings (1000 rows) meets the new replicas' (200)."""
    trials = 2000
    merged = []
    for s in range(trials):
        big, small = stream(25, range(30), s), stream(10, range(30, 50), s + 10**6)
        m = big.merge(small) if s % 2 else small.merge(big)  # either side may be the larger
        for i in range(50, 60):
            m.add([i])
        merged.append(m)
    assert all(m.capacity == 10 and m.seen == 60 and len(m.sample) == 10 for m in merged)
    assert inclusion_pvalue(merged, 60) > 1e-3
    with pytest.raises(ValueError, match="3 and 2 dimensions"):
        Reservoir(5, 3).merge(Reservoir(5, 2))


def test_float16_reservoir_keeps_its_dtype_through_pickle_json_merge_and_copy():
    rows = np.random.default_rng(0).normal(size=(30, 4))
    r = Reservoir(20, 4, seed=0, dtype="float16")
    r.add_batch(rows)
    assert r.sample.dtype == np.float16 and np.allclose(r.sample, np.float16(r.sample).astype(float))
    assert np.abs(r.sample[:1].astype(float) - rows[:1]).max() < 2e-3 * np.abs(rows[:1]).max()  # the first row stays
    for back in (pickle.loads(pickle.dumps(r)), Reservoir.from_dict(json.loads(json.dumps(r.to_dict()))), r.copy()):
        assert back.sample.dtype == np.float16 and (back.sample == r.sample).all() and back.seen == 30
    assert r.merge(Reservoir(20, 4)).sample.dtype == np.float16
    r32 = Reservoir(20, 4, seed=0)
    r32.add_batch(rows)
    assert len(pickle.dumps(r32)) - len(pickle.dumps(r)) >= 20 * 4 * 2 - 16  # two bytes a value on the wire, not four


def test_live_states_keep_the_embeddings_mmd_judges_and_a_push_travels_inline():
    """A replica's push of a count window of 500 quickstart records (128-d embeddings, a request id each) must stay
    under Ray's 100 KB limit for arguments sent with the call: above it, a push goes through the object store at
    ~2.6x the CPU. The window keeps MMD_POINTS embeddings, as float16; feature samples keep their default."""
    rng, bins = np.random.default_rng(0), make_bins()
    state = live_state(bins)
    ids = [f"{i:032x}" for i in rng.integers(0, 2**62, 500)]
    state.add_batch(
        rng.integers(0, 10, 500),
        rng.choice(["a", "b"], 500),
        rng.normal(size=(500, N_FEATURES)),
        {"embedding": rng.normal(size=(500, 128))},
        t=1.0,
        request_ids=ids,
    )
    emb = state.reservoirs["embedding"]
    assert (emb.capacity, emb.sample.shape, emb.sample.dtype) == (MMD_POINTS, (MMD_POINTS, 128), np.float16)
    assert len(pickle.dumps(state)) < 100 * 1024
    state.add_batch([1], ["a"], samples={"features": [[0.0, 1.0]]}, t=2.0)
    assert state.reservoirs["features"].capacity == 1000  # what is not listed keeps reservoir_capacity
    # how it keeps its samples survives a copy, the next pane and a save
    for other in (state.copy(), state.take_pending(), WindowState.from_dict(json.loads(json.dumps(state.to_dict())))):
        assert other.samples == {"embedding": SampleSpec(MMD_POINTS, "float16")}


@pytest.mark.parametrize("sizes", [[7, 30, 13], [60], [3, 4, 5]])  # crossing capacity 10 mid-batch, or never
def test_reservoir_add_batch_equals_adds_one_by_one(sizes):
    rows = np.random.default_rng(0).normal(size=(sum(sizes), 2))
    one, batch = Reservoir(10, 2, seed=3), Reservoir(10, 2, seed=3)
    for row in rows:
        one.add(row)
    for part in np.split(rows, np.cumsum(sizes)[:-1]):
        batch.add_batch(part)
    assert one.seen == batch.seen and (one.sample == batch.sample).all()


def test_reservoir_dict_is_exact_through_json_and_reads_the_older_list_format():
    r = Reservoir(10, 3, seed=0)
    r.add_batch(np.random.default_rng(0).normal(size=(7, 3)))
    back = Reservoir.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.seen == 7 and back.sample.dtype == np.float32 and (back.sample == r.sample).all()
    older = {**r.to_dict(), "rows": r.sample.tolist()}
    assert (Reservoir.from_dict(older).sample == r.sample).all()
    assert Reservoir.from_dict(Reservoir(10, 3).to_dict()).sample.shape == (0, 3)


def test_reservoir_pickles_only_its_kept_rows_and_continues_alike():
    r = Reservoir(1000, 128, seed=0)
    r.add_batch(np.random.default_rng(0).normal(size=(125, 128)))
    copy = pickle.loads(pickle.dumps(r))
    assert len(pickle.dumps(r)) < 125 * 128 * 4 + 10_000  # not the 1000-row buffer
    assert copy.seen == 125 and (copy.sample == r.sample).all() and copy._rows.shape == (1000, 128)
    more = np.random.default_rng(1).normal(size=(2000, 128))
    r.add_batch(more)
    copy.add_batch(more)  # the random generator travelled too: the same choices
    assert copy.seen == r.seen and (copy.sample == r.sample).all()


def test_the_uniformity_check_catches_a_naive_merge():
    """Half from each side regardless of stream sizes over-represents the smaller stream; the check must see it."""
    naive = []
    for s in range(500):
        a, b = stream(10, range(10), s), stream(10, range(10, 50), s + 10**6)
        naive.append(
            Reservoir.from_dict(
                {"capacity": 10, "dim": 1, "seen": 50, "rows": np.concatenate([a.sample[:5], b.sample[:5]]).tolist()}
            )
        )
    assert inclusion_pvalue(naive, 50) < 1e-6


def test_malformed_record_is_refused_before_counting():
    state = WindowState(make_bins())
    with pytest.raises(ValueError, match="`features` must hold 3 values"):
        state.add(1, "a", features=[0.0, 1.0])
    with pytest.raises(ValueError, match="unknown categorical signals"):
        state.add(1, "a", categories={"size": "XL"})
    assert state.n == 0 and state.predicted == {}
