"""A language model's fairness evidence without Ray: per-group perplexity, its gate, the card's table, bad input.

A tiny GPT-2 is trained in-process for a second on text whose two dialects use disjoint words: trained on one
dialect only, the other's perplexity is orders of magnitude higher (the gate fails, naming both); judged on a
coin-flip column drawn independently of the text, the groups are modelled alike (the gate passes).
"""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from steward.cli import app
from steward.data import DataError, load_splits, prepare_data
from steward.evaluate.run import evaluate, write_metrics
from steward.govern.card import CARD_MD, write_card
from steward.models import build_model, task_loss
from steward.runs import create_run
from steward.serve.registry import gate_results
from steward.spec import SpecError, validate_job

WORDS = {"a": "the cat sat on a mat and then it slept", "b": "zebra quartz vortex jumbo fjord glyph nymph crwth pyx"}
GPT = {"model_type": "gpt2", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """400 rows: text in dialect a or b (disjoint words), and a coin column that says nothing about the text."""
    folder = tmp_path_factory.mktemp("lm-fairness")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(400):
        dialect = "ab"[i % 2]
        words = rng.choice(WORDS[dialect].split(), rng.integers(5, 10))
        rows.append({"text": " ".join(words), "dialect": dialect, "coin": str(rng.choice(["heads", "tails"]))})
    pd.DataFrame(rows).to_csv(folder / "text.csv", index=False)
    return folder


def lm_job(folder, group_columns=("dialect", "coin"), fairness=None, **top):
    raw = {
        "name": "lm-fair",
        "output_dir": str(folder / "runs"),
        "data": {
            "source": f"file:{folder}/text.csv",
            "input_column": "text",
            "group_columns": list(group_columns),
            "max_length": 16,
            "tokenizer": {"kind": "bpe", "vocab_size": 100},
        },
        "model": {"family": "transformer", "task": "causal_lm", "params": {**GPT, "dropout": 0.0}},
        "evaluate": {"metrics": ["loss", "perplexity"], "fairness": {"bootstrap": 100, **(fairness or {})}},
        **top,
    }
    return validate_job(raw, "test", folder)


def trained(spec, info, dialects):
    """A tiny GPT-2 trained (seeded, a few Adam epochs) on the train rows of the given dialects only."""
    train = load_splits(spec, info, ["train"])["train"]
    train = train.take(torch.tensor([i for i, d in enumerate(train.groups["dialect"]) if d in dialects]))
    torch.manual_seed(0)
    model = build_model(spec.model, info)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(30):
        for batch in train.batches(64):
            loss = task_loss("causal_lm", model(batch["inputs"], batch.get("attention_mask")), batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def unfair(corpus):
    """A model that learnt dialect a only, evaluated with a perplexity_ratio gate on dialect."""
    spec = lm_job(corpus, fairness={"group_column": "dialect", "thresholds": {"perplexity_ratio": 1.25}})
    info = prepare_data(spec, None)
    return spec, info, evaluate(trained(spec, info, {"a"}), info, spec)


def test_a_group_the_model_never_learnt_fails_the_perplexity_gate_with_the_values_named(unfair):
    _, _, result = unfair
    report = result["fairness"]
    assert report["group_column"] == "dialect" and report["measure"] == "perplexity"
    assert set(report["splits"]) == {"validation", "test"}
    test = report["splits"]["test"]
    a, b = test["groups"]["a"], test["groups"]["b"]
    assert (test["worst_group"], test["best_group"]) == ("b", "a")
    assert b["perplexity"] > 20 * a["perplexity"]
    assert test["metrics"]["perplexity_ratio"] == pytest.approx(b["perplexity"] / a["perplexity"])
    assert test["metrics"]["perplexity_difference"] == pytest.approx(b["perplexity"] - a["perplexity"])
    for row in (a, b):  # the table's numbers are metrics.json's per-group numbers, with an interval around them
        low, high = row["perplexity_ci"]
        assert low <= row["perplexity"] <= high and row["loss_ci"][0] <= row["loss"] <= row["loss_ci"][1]
    for value in "ab":
        expected = result["groups"]["dialect"][value]
        assert test["groups"][value]["perplexity"] == expected["perplexity"]
        assert test["groups"][value]["count"] == expected["count"]
    assert result["fairness_gate"] == "failed"
    [problem] = result["fairness_gate_problems"]
    assert problem.startswith(f"perplexity_ratio = {test['metrics']['perplexity_ratio']:.4f}, must be at most 1.25")
    assert f"dialect='b': perplexity {b['perplexity']:.4f}" in problem
    assert f"dialect='a': {a['perplexity']:.4f}" in problem


def test_groups_drawn_from_the_same_text_pass_the_gate(corpus):
    thresholds = {"perplexity_ratio": 1.25, "perplexity_difference": 1.0}
    spec = lm_job(corpus, fairness={"group_column": "coin", "thresholds": thresholds})
    info = prepare_data(spec, None)
    result = evaluate(trained(spec, info, {"a", "b"}), info, spec)
    test = result["fairness"]["splits"]["test"]
    assert set(test["groups"]) == {"heads", "tails"}
    assert 1.0 <= test["metrics"]["perplexity_ratio"] < 1.25 and test["metrics"]["perplexity_difference"] < 1.0
    assert result["fairness_gate"] == "passed" and result["fairness_gate_problems"] == []


def test_without_thresholds_the_table_is_written_and_no_gate_is_set(corpus, unfair):
    _, info, _ = unfair
    spec = lm_job(corpus, group_columns=["dialect"], fairness={"splits": ["test"], "bootstrap": 0})
    result = evaluate(trained(spec, info, {"a"}), info, spec)
    assert list(result["fairness"]["splits"]) == ["test"] and "fairness_gate" not in result
    assert "perplexity_ci" not in result["fairness"]["splits"]["test"]["groups"]["a"]


def test_the_card_and_the_gates_show_the_language_models_per_group_perplexity(unfair):
    spec, _, result = unfair
    run_dir = create_run(spec)
    (run_dir / "model").mkdir()
    (run_dir / "model" / "model.json").write_text(json.dumps({"num_parameters": 4321, "data": {"modality": "text"}}))
    (run_dir / "model" / "model.safetensors").write_bytes(b"weights")
    (run_dir / "history.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "train_loss": 2.0}) + "\n")
    write_metrics(run_dir, json.loads(json.dumps(result)))
    card = write_card(run_dir)
    assert card["metrics"]["fairness_gate"] == card["fairness"]["gate"] == "failed"
    assert card["fairness"]["problems"] == result["fairness_gate_problems"]
    assert card["fairness"]["report"]["splits"]["test"]["groups"]["b"]["perplexity"] == pytest.approx(
        result["fairness"]["splits"]["test"]["groups"]["b"]["perplexity"]
    )
    markdown = (run_dir / CARD_MD).read_text()
    b = result["fairness"]["splits"]["test"]["groups"]["b"]
    low, high = b["perplexity_ci"]
    assert "| dialect | n | loss | perplexity |" in markdown
    assert f"| b | {b['count']} | {b['loss']:.4f} " in markdown
    assert f"{b['perplexity']:.4f} [{low:.4f}, {high:.4f}]" in markdown
    assert "Fairness gate: **failed**" in markdown and "- perplexity_ratio = " in markdown
    printed = CliRunner().invoke(app, ["card", str(run_dir)])
    assert printed.exit_code == 0 and "| dialect | n | loss | perplexity |" in printed.output
    assert gate_results(spec, run_dir)["fairness"] == "failed"  # the registry's steward.gate.fairness tag


def test_too_few_rows_in_a_group_names_the_field_the_group_and_the_count(corpus, unfair):
    _, info, result = unfair
    counts = {v: g["count"] for v, g in result["groups"]["dialect"].items()}
    small = min(counts, key=counts.get)
    spec = lm_job(corpus, group_columns=["dialect"], fairness={"splits": ["test"], "min_group_size": counts[small] + 1})
    with pytest.raises(DataError) as err:
        evaluate(trained(spec, info, {"a"}), info, spec)
    message = str(err.value)
    assert message.startswith("evaluate.fairness.min_group_size: ")
    assert f"group dialect={small!r} has {counts[small]} row(s) in the test split" in message
    assert "lower evaluate.fairness.min_group_size" in message
    assert len(err.value.problems) == sum(n <= counts[small] for n in counts.values())


def test_a_group_column_missing_from_the_data_is_named(corpus):
    spec = lm_job(corpus, group_columns=["region"])
    with pytest.raises(DataError, match=r"data.group_columns: 'region' is not a column of file:.*columns are text"):
        prepare_data(spec, None)


@pytest.mark.parametrize(
    ("task", "fairness", "train", "path", "fragment"),
    [
        ("causal_lm", {"thresholds": {"demographic_parity_difference": 0.1}}, {}, "thresholds", "judge predicted"),
        ("classification", {"thresholds": {"perplexity_ratio": 1.25}}, {}, "thresholds", "(task: causal_lm)"),
        ("causal_lm", {}, {"mitigation": {"method": "reweigh"}}, "train.mitigation", "needs task: classification"),
        ("causal_lm", {"positive_label": "1"}, {}, "positive_label", "a causal_lm has neither"),
        ("causal_lm", {"min_group_size": 0}, {}, "min_group_size", "greater than or equal to 1"),
    ],
)
def test_settings_the_task_cannot_use_name_the_field_and_the_fix(corpus, task, fairness, train, path, fragment):
    raw = lm_job(corpus, group_columns=["dialect"]).model_dump(mode="json", exclude_defaults=True)
    raw["model"]["task"], raw["evaluate"]["fairness"], raw["train"] = task, fairness, train
    if task == "classification":
        raw["data"]["label_column"], raw["evaluate"]["metrics"] = "coin", ["accuracy"]
    with pytest.raises(SpecError) as err:
        validate_job(raw, "test", corpus)
    where = path if path.startswith("train.") else f"evaluate.fairness.{path}"
    assert any(p.path == where and fragment in p.message for p in err.value.problems), err.value.problems


def test_a_causal_lm_with_group_columns_and_a_perplexity_gate_is_a_valid_spec(corpus):
    spec = lm_job(corpus, fairness={"thresholds": {"perplexity_ratio": 1.25, "perplexity_difference": 5}})
    assert spec.data.group_columns == ["dialect", "coin"] and spec.evaluate.fairness.min_group_size == 10
