"""Unit tier: the pieces of a language model's monitoring, without Ray: the n-gram set, serve.output_pii over a
stream, window totals and leak checks, a replica's completion queue, the spec's refusals."""

import numpy as np
import pytest

from steward.errors import StewardError
from steward.monitor.bins import Bins
from steward.monitor.checks import AlertTracker, leak_checks, window_report
from steward.monitor.ngrams import MAX_NGRAMS, NGRAMS_FILE, NgramSet, load_ngrams, ngram_hashes
from steward.monitor.window_state import WindowState
from steward.serve.lm_monitor import Completion, CompletionQueue
from steward.serve.monitoring import reference_problem
from steward.serve.output_pii import HOLD, OutputGuard
from steward.spec import load_job
from steward.spec.monitor import LeakSpec, MonitorSpec
from steward.spec.privacy import PrivacySpec
from tests.conftest import JOBS

TEXT = (
    "thanks for asking. please write to jane.doe@example.com or call 415-555-0132 before friday, and quote the "
    "card 4111 1111 1111 1111 on the form; nothing else is needed from you today."
)


def test_ngram_set_finds_training_ngrams_and_only_them():
    rng = np.random.default_rng(0)
    train = [rng.integers(0, 500, 40) for _ in range(50)]
    ngrams = NgramSet.build(train, 8)
    assert ngrams.count(train[3][5:20]) == (8, 8)  # 15 tokens hold 8 windows of 8, each from training
    assert ngrams.count(rng.integers(500, 1000, 20)) == (0, 13)  # unseen ids
    assert ngrams.count(train[0][:7]) == (0, 0)  # shorter than n: nothing judged
    mixed = np.concatenate([train[1][:10], rng.integers(500, 1000, 10)])
    found, judged = ngrams.count(mixed)
    assert (found, judged) == (3, 13)  # the windows wholly inside the training part


def test_a_capped_ngram_set_estimates_the_share_without_bias():
    rng = np.random.default_rng(1)
    train = [rng.integers(0, 10_000, 200) for _ in range(200)]
    capped = NgramSet.build(train, 8, max_size=4_000)
    assert len(capped.hashes) == 4_000 and capped.cut < np.iinfo(np.uint64).max
    half_seen = [np.concatenate([t[:100], rng.integers(10_000, 20_000, 100)]) for t in train[:100]]
    counts = np.array([capped.count(ids) for ids in half_seen]).sum(0)
    assert counts[1] < 0.2 * 100 * 186  # about 4,000 / 39,000 of the windows are judged
    assert counts[0] / counts[1] == pytest.approx(93 / 186, abs=0.06)  # the share found, as the whole set has it


def test_ngram_hashes_depend_on_order_and_every_token():
    base = ngram_hashes(list(range(10)), 4)
    assert len(set(base.tolist())) == 7
    assert ngram_hashes([0, 1, 2, 4], 4)[0] != base[0] and ngram_hashes([1, 0, 2, 3], 4)[0] != base[0]


def test_an_ngram_file_round_trips_and_a_hostile_one_is_refused(tmp_path):
    ngrams = NgramSet.build([list(range(30))], 8)
    ngrams.save(tmp_path)
    loaded = load_ngrams(tmp_path)
    assert loaded is not None and loaded.n == 8 and np.array_equal(loaded.hashes, ngrams.hashes)
    assert load_ngrams(tmp_path / "none") is None
    # a pickled object array (code that runs when unpickled) is never unpickled
    np.savez(tmp_path / NGRAMS_FILE, hashes=np.array([object()], dtype=object), n=8, cut=0)
    with pytest.raises(StewardError, match="is not a steward n-gram set"):
        load_ngrams(tmp_path)
    np.savez(tmp_path / NGRAMS_FILE, hashes=np.array([5, 3], dtype=np.uint64), n=8, cut=0)  # unsorted
    with pytest.raises(StewardError, match="malformed"):
        load_ngrams(tmp_path)
    (tmp_path / NGRAMS_FILE).write_bytes(b"not a zip")
    with pytest.raises(StewardError, match="retrain"):
        load_ngrams(tmp_path)
    assert MAX_NGRAMS * 8 <= 32 * 2**20


def stream(guard, text, sizes):
    """Feed `text` in pieces of the given sizes (cycled); returns what the client got and whether it was blocked."""
    out, at, i = [], 0, 0
    while at < len(text):
        piece = text[at : at + sizes[i % len(sizes)]]
        at, i = at + len(piece), i + 1
        sent, blocked = guard.feed(piece, final=at >= len(text))
        out.append(sent)
        if blocked:
            return "".join(out), True
    return "".join(out), False


@pytest.mark.parametrize("sizes", [[len(TEXT)], [1], [3], [7, 1, 2], [64], [65, 5]])
def test_mask_sends_the_same_masked_text_however_the_stream_is_cut(sizes):
    whole = "thanks for asking. please write to <EMAIL> or call <PHONE> before friday, and quote the card <CREDIT_CARD>"
    text, blocked = stream(OutputGuard("mask", PrivacySpec()), TEXT, sizes)
    assert not blocked and text.startswith(whole) and text.endswith("nothing else is needed from you today.")


@pytest.mark.parametrize("sizes", [[len(TEXT)], [1], [5, 2]])
def test_block_ends_before_the_first_value_and_allow_passes_everything(sizes):
    text, blocked = stream(OutputGuard("block", PrivacySpec()), TEXT, sizes)
    assert blocked and text == "thanks for asking. please write to "
    assert stream(OutputGuard("allow", PrivacySpec()), TEXT, sizes) == (TEXT, False)


def test_mask_holds_back_only_the_last_characters_of_a_stream():
    guard = OutputGuard("mask", PrivacySpec(entities=["email"]))
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    sent, _ = guard.feed(words)
    assert sent and words.startswith(sent) and len(words) - len(sent) <= HOLD + len("sixteen ")
    assert guard.feed("", final=True)[0] == words[len(sent) :]


def test_window_totals_add_across_replicas_and_survive_a_restart():
    a, b = WindowState(), WindowState()
    a.add_batch(["stop"], totals={"pii.email": 2, "ngrams.judged": 5})
    b.add_batch(["length", "stop"], totals={"pii.email": 1, "pii.phone": 0})
    merged = a.merge(b)
    assert merged.totals == {"pii.email": 3, "ngrams.judged": 5, "pii.phone": 0} and a.totals["pii.email"] == 2
    assert WindowState.from_dict(merged.to_dict()).totals == merged.totals


def test_leak_checks_judge_each_type_and_recover_when_a_type_stops():
    cfg = MonitorSpec(leaks=LeakSpec(max_pii=1, max_regurgitation=0.5))
    leaky, clean = WindowState(), WindowState()
    leaky.add_batch(["stop"] * 3, totals={"pii.email": 2, "pii.phone": 1, "ngrams.judged": 10, "ngrams.found": 6})
    clean.add_batch(["stop"] * 3, totals={"pii.email": 0, "pii.phone": 0, "ngrams.judged": 10, "ngrams.found": 1})
    judged = {c.name: (c.value, c.status) for c in leak_checks(leaky, cfg.leaks)}
    assert judged == {"pii:email": (2, "fail"), "pii:phone": (1, "ok"), "regurgitation": (0.6, "fail")}
    tracker = AlertTracker(1)
    opened = tracker.update(window_report(leaky, None, cfg))
    assert {e["name"] for e in opened} == {"pii:email", "regurgitation"}
    assert {e["event"] for e in tracker.update(window_report(clean, None, cfg))} == {"recovered"}
    nothing = WindowState()
    nothing.add_batch(["stop"], totals={"pii.email": 0, "ngrams.judged": 0})
    assert {c.name: c.status for c in leak_checks(nothing, cfg.leaks)}["regurgitation"] == "insufficient"


def test_a_replica_counts_completions_into_signals_and_leak_totals(tmp_path):
    (tmp_path / "model").mkdir()
    NgramSet.build([list(range(100, 140))], 8).save(tmp_path / "model")
    bins = Bins({"output.length": [2.0, 5.0], "output.logprob": [-2.0], "text.length": [3.0], "text.unk_rate": [0.1]})
    cfg = MonitorSpec(leaks=LeakSpec())
    queue = CompletionQueue(bins, cfg, tmp_path, PrivacySpec(entities=["email", "phone"]), unk=1)
    queue.append(Completion([2, 1, 1, 7], list(range(100, 112)), -6.0, "stop", "mail a@b.example.com", np.ones(4)))
    queue.append(Completion([2, 9], [5, 6, 7], -9.0, "length", "no data here", np.zeros(4)))
    state = WindowState(bins)
    queue.count_into(state)
    assert state.n == 2 and queue.queued == 0
    assert state.totals == {"pii.email": 1, "pii.phone": 0, "ngrams.found": 5, "ngrams.judged": 5}
    rows = {name: state.histogram(name).tolist() for name in bins.names}
    assert rows["output.length"] == [0, 1, 1]  # 3 tokens in [2, 5), 12 in [5, inf)
    assert rows["output.logprob"] == [1, 1]  # means -9 / 3 and -6 / 12
    assert rows["text.unk_rate"] == [1, 1]  # 0 of 2, and 2 of 4 unknown
    assert state.reservoirs["embedding"].sample.shape == (2, 4)


def test_the_spec_refuses_what_a_language_model_cannot_be_watched_with(tmp_path):
    with pytest.raises(StewardError, match=r"monitor\.bias \[--set\]: live bias needs predicted classes"):
        load_job(
            JOBS / "tiny-gpt.yaml", ["monitor.bias={group: g, favourable: x, metrics: [demographic_parity_difference]}"]
        )
    with pytest.raises(StewardError, match=r"monitor\.performance \[--set\]: judges late labels"):
        load_job(JOBS / "tiny-gpt.yaml", ["monitor.performance={min_accuracy: 0.9}"])
    with pytest.raises(StewardError, match=r"monitor\.leaks \[--set\]: judges generated text"):
        load_job(JOBS / "quickstart.yaml", ["monitor={leaks: {}}"])
    with pytest.raises(StewardError, match=r"serve\.output_pii \[--set\]: applies to generated text"):
        load_job(JOBS / "quickstart.yaml", ["serve.output_pii=mask"])
    with pytest.raises(StewardError, match=r"monitor\.leaks\.ngram"):
        load_job(JOBS / "tiny-gpt.yaml", ["monitor.leaks.ngram=2"])
    (tmp_path / "model").mkdir()
    leaks = MonitorSpec(leaks=LeakSpec())
    assert "retrain the run" in reference_problem(leaks, tmp_path)
    NgramSet.build([list(range(30))], 6).save(tmp_path / "model")
    assert reference_problem(leaks, tmp_path) == ("monitor.leaks.ngram is 8, and the run saved 6-grams: set it to 6")
