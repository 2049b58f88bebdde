"""`steward explain RUN` on real trained runs (tiny, trained in-process without Ray): the files it writes, the
Transformer's IG completeness on a real model and tokenizer, and user errors as exit 2.

The command runs in-process through Click's runner (the real parsing, exit codes and output; tests/test_cli.py
covers the subprocess entry point): each subprocess would pay torch, transformers and captum imports again.
"""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from steward.cli import app
from tests.serving import trained_run, validation_inputs

# Small versions of the shipped jobs: real data, tokenizer and run folders, trained in seconds.
RUNS = {
    "cnn": ("quickstart.yaml", ["model.params.channels=[8,16]", "model.params.hidden_size=32"], 1),
    "transformer": ("text-transformer.yaml", ["data.options.num_samples=500", "data.tokenizer.vocab_size=200"], 2),
}
# |sum(attributions) - (F(x) - F(baseline))| on class probabilities at 64 steps. Measured here: ~7e-3 at
# worst for the digits CNN (ReLU / max-pool kinks), ~2e-3 to 6e-3 for the Transformer.
TOLERANCE = {"cnn": 2e-2, "transformer": 2e-2}


def steward(*args):
    """`steward ARGS` in-process: returncode, stdout, stderr as a subprocess would give them."""
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain-runs")
    return {name: trained_run(root / name, job, *extra, epochs=epochs) for name, (job, extra, epochs) in RUNS.items()}


def _words(record):
    """Attribution per word: WordPiece continuations (##) summed into the word they continue."""
    merged: list[list] = []
    for token, value in zip(record["tokens"], record["attributions"], strict=True):
        if token.startswith("##") and merged:
            merged[-1][0] += token[2:]
            merged[-1][1] += value
        else:
            merged.append([token, value])
    return dict(merged)


def _written(out, run_dir):
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    [folder] = (run_dir / "explanations").iterdir()
    assert str(folder) in out.stdout.replace("\n", "")
    return folder


def test_explain_an_image_run_writes_json_heatmap_and_permutation(runs, tmp_path):
    spec, run_dir = runs["cnn"]
    instances = validation_inputs(spec, 3)
    out = steward("explain", str(run_dir), "--input", json.dumps(instances), "--permutation", "--steps", "64")
    folder = _written(out, run_dir)
    payload = json.loads((folder / "attributions.json").read_text())
    assert payload["baseline"] == "zeros" and payload["n_steps"] == 64 and len(payload["explanations"]) == 3
    for record in payload["explanations"]:
        assert len(record["attributions"]) == 8 and len(record["attributions"][0]) == 8  # per pixel
        assert abs(record["delta"]) <= TOLERANCE["cnn"]
        assert record["attribution_sum"] == pytest.approx(record["score"] - record["baseline_score"], abs=0.05)
    assert (folder / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    permutation = json.loads((folder / "permutation.json").read_text())
    features = permutation["features"]["importances"]
    assert len(features) == 8 and len(permutation["steps"]["importances"]) == 8  # image columns and rows
    assert all(len(r["repeats"]) == 5 for r in features)
    assert max(r["mean"] for r in features) > 0.05  # shuffling a column of pixels costs real accuracy


def test_explain_a_text_run_writes_json_and_token_html_and_is_complete(runs, tmp_path):
    spec, run_dir = runs["transformer"]
    texts = [*validation_inputs(spec, 3), "this was <great> & wonderful"]
    source = tmp_path / "texts.json"
    source.write_text(json.dumps({"instances": texts}))
    out = steward("explain", str(run_dir), "--input", str(source), "--target", "1", "--steps", "64")
    folder = _written(out, run_dir)
    payload = json.loads((folder / "attributions.json").read_text())
    assert payload["baseline"] == "pad" and payload["modality"] == "text"
    for record in payload["explanations"]:
        assert record["target"] == "1" and record["tokens"][0] == "[CLS]" and record["tokens"][-1] == "[SEP]"
        assert len(record["tokens"]) == len(record["attributions"])
        assert abs(record["delta"]) <= TOLERANCE["transformer"]
    words = _words(payload["explanations"][-1])
    assert max(words, key=words.get) in ("great", "wonderful")  # the positive words carry the positive class
    page = (folder / "tokens.html").read_text()
    assert "<great>" not in page and "title='+" in page  # values on hover
    assert page.count("class='row'") == 4


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--input", "[1, 2"], "--input: not valid JSON"),
        (["--input", "nowhere.json"], "neither a JSON file nor inline JSON"),
        (["--input", "[[1, 2]]"], "expected a 8x8 array"),
        ([], "nothing to explain"),
        (["--permutation", "--steps", "1"], "at least 2 steps"),
        (["--input", json.dumps([[[0] * 8] * 8]), "--target", "cat"], "not a label"),
    ],
)
def test_bad_explain_input_exits_2(runs, args, fragment):
    _, run_dir = runs["cnn"]
    out = steward("explain", str(run_dir), *args)
    assert out.returncode == 2 and fragment in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_permutation_on_text_is_refused_with_exit_2(runs):
    _, run_dir = runs["transformer"]
    out = steward("explain", str(run_dir), "--permutation")
    assert out.returncode == 2 and "not text" in out.stderr
