"""The CLI as a user meets it: a real subprocess, exit codes, messages, and never a traceback."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import JOBS, ROOT

STEWARD = [sys.executable, "-m", "steward"]


def steward(*args, cwd=ROOT, timeout=900):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*STEWARD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def write_job(tmp_path, **changes):
    raw = yaml.safe_load((JOBS / "quickstart.yaml").read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    raw["output_dir"] = str(tmp_path / "runs")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("command", [[], ["train"], ["validate"], ["render"], ["evaluate"], ["runs"], ["schema"]])
def test_help(command):
    out = steward(*command, "--help")
    assert out.returncode == 0 and "Usage" in out.stdout


def test_validate_all_jobs_one_line_each():
    out = steward("validate", *sorted(str(p) for p in JOBS.glob("*.yaml")))
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if line.startswith("ok ")]) == len(list(JOBS.glob("*.yaml")))


def test_validate_reports_every_problem_with_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: q\ndata:\n  source: builtin:digits\n  batchsize: 3\nmodel:\n  family: cnn\n  parms: {}\n")
    out = steward("validate", str(bad))
    assert out.returncode == 2
    assert "data.batchsize [line 4]: unknown key; did you mean `batch_size`?" in out.stderr
    assert "model.parms [line 7]" in out.stderr and "Traceback" not in out.stderr


def test_render_shows_defaults_and_overrides():
    out = steward("render", str(JOBS / "quickstart.yaml"), "--set", "train.optimizer.lr=3e-4")
    rendered = yaml.safe_load(out.stdout)
    assert rendered["train"]["optimizer"]["lr"] == 3e-4 and rendered["distributed"]["max_failures"] == 0


def test_schema_is_json():
    schema = json.loads(steward("schema").stdout)
    assert "data" in schema["properties"] and schema["additionalProperties"] is False


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"data__source": "builtin:imagenet"}, "data.source"),
        ({"data__source": "file:nowhere.csv", "data__input_column": "x", "data__label_column": "y"}, "does not exist"),
        ({"data__label_column": "lable"}, "data.label_column"),
        ({"model__params__kernel_size": 11}, "model.params.kernel_size"),
        ({"distributed__deepspeed_overrides": {"train_batch_size": 7}}, "DeepSpeed rejects"),
        ({"distributed__num_workers": 64}, "distributed.num_workers"),
    ],
)
def test_bad_input_exits_2_with_one_clear_error_and_no_successful_run(tmp_path, changes, fragment):
    out = steward("train", str(write_job(tmp_path, **changes)))
    assert out.returncode == 2, out.stdout + out.stderr
    assert fragment in out.stderr and "Traceback" not in out.stderr + out.stdout
    statuses = [json.loads(p.read_text())["state"] for p in (tmp_path / "runs").glob("*/*/status.json")]
    assert "succeeded" not in statuses


def test_malformed_yaml_exits_2(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\ndata: {source: builtin:digits\n")
    out = steward("train", str(path))
    assert out.returncode == 2 and "malformed YAML" in out.stderr and "line" in out.stderr


def tracked_in_mlflow(output_dir, run_dir, metrics, stdout):
    """The run in the embedded MLflow store: parameters, every epoch's metrics at its step, test metrics, artifacts."""
    from mlflow import MlflowClient

    store = f"sqlite:///{output_dir / 'mlflow.db'}"
    assert f"mlflowui--backend-store-uri{store}" in "".join(stdout.split()), stdout  # wrapped or not
    client = MlflowClient(store)
    [logged] = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert logged.info.status == "FINISHED" and logged.info.run_name == run_dir.name
    assert logged.data.params["distributed.zero_stage"] == "2" and logged.data.tags["steward.state"] == "succeeded"
    epochs = [r for r in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    val = client.get_metric_history(logged.info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in val] == [(r["step"], r["val_accuracy"]) for r in epochs]
    assert logged.data.metrics["test_accuracy"] == metrics["overall"]["accuracy"]
    logged_files = {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {"spec.yaml", "metrics.json", "curves.png", "model_card.md", "model_card.json", "model"} <= logged_files
    assert "reference.json" in logged_files  # the reference profile's summary
    version = client.get_model_version_by_alias("quickstart", "challenger")  # registered, gates passed
    assert version.run_id == logged.info.run_id and version.tags["steward.gate.policy"] == "passed"
    assert version.description.startswith("# ") and "models:/quickstart/1 (challenger)" in "".join(stdout.split("\n"))


def tensorboard_scalars(run_dir):
    """tracking.tensorboard's event files read back with TensorBoard's own reader: {tag: [(step, value)]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path):
    # --no-serve: with an embedded Ray, deploying would serve until Ctrl-C (test_serve.py covers run + deploy).
    sets = ["--set", f"output_dir={tmp_path / 'runs'}", "--set", "tracking.tensorboard=true"]
    out = steward("run", str(JOBS / "quickstart.yaml"), *sets, "--no-serve")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    [run_dir] = (tmp_path / "runs" / "quickstart").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["overall"]["accuracy"] >= 0.97, metrics
    assert json.loads((run_dir / "status.json").read_text())["state"] == "succeeded"
    for artifact in ("spec.yaml", "history.jsonl", "curves.png", "model/model.safetensors", "model/model.json"):
        assert (run_dir / artifact).exists(), artifact
    assert "accuracy" in out.stdout and str(run_dir) in out.stdout.replace("\n", "")
    tracked_in_mlflow(tmp_path / "runs", run_dir, metrics, out.stdout)
    epochs = [r for r in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    scalars = tensorboard_scalars(run_dir)
    assert [(s, pytest.approx(v)) for s, v in scalars["val_accuracy"]] == [
        (r["step"], r["val_accuracy"]) for r in epochs
    ]
    listed = steward("runs", "--output-dir", str(tmp_path / "runs"))
    assert "quickstart" in listed.stdout and "succeeded" in listed.stdout
    again = steward("evaluate", str(run_dir))
    assert again.returncode == 0 and f"{metrics['overall']['accuracy']:.4f}" in again.stdout
