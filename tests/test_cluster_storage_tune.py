"""Sweeps and --resume in cluster storage: a real S3 API (moto's server on loopback) as output_dir, the real CLI.

A sweep gives Ray Tune the bucket as its storage; each trial publishes its own run folder there, the sweep its
results and model, status.json last. `--resume URI` continues a sweep from the checkpoints in the bucket (a run:
test_cluster_storage.py), and a run that cannot be continued is refused with --resume named and the fix.
"""

import csv
import io
import json
import signal
import subprocess
import time

import pytest
import yaml
from typer.testing import CliRunner

from steward.cli import app
from steward.spec import load_job
from steward.storage import join
from tests.conftest import JOBS, ROOT, STEWARD, read, steward, stored

# The ASHA sweep example at its smallest: 2 trials of 2 epochs, every trial run to its end.
SWEEP = ["train.epochs=2", "tune.num_samples=2", "tune.scheduler={name: fifo}"]


def sets(*overrides):
    return [a for s in overrides for a in ("--set", s)]


def run_ids(s3, name):
    return {p.split("/")[0] for p in stored(s3, f"runs/{name}")}


def history(s3, run):
    return [json.loads(line) for line in read(s3, f"runs/{run}/history.jsonl").splitlines()]


@pytest.fixture(scope="module")
def swept(s3):
    """The ASHA example swept through `steward tune` into the bucket: (CLI result, run id)."""
    out = steward(s3, "tune", JOBS / "tune-digits-asha.yaml", *sets(f"output_dir={s3['uri']}", *SWEEP))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_id,) = run_ids(s3, "tune-digits-asha")
    return out, run_id


@pytest.mark.slow
def test_a_sweep_writes_trials_results_and_model_to_s3(s3, swept):
    out, run_id = swept
    files = stored(s3, f"runs/tune-digits-asha/{run_id}")
    for name in (
        "spec.yaml",
        "best.yaml",
        "results.csv",
        "trials.png",
        "metrics.json",
        "model/model.safetensors",
        "model/reference.json",
        "history.jsonl",
        "curves.png",
        "model_card.md",
        "tune/tuner.pkl",
    ):
        assert name in files, (name, sorted(files))
    assert json.loads(read(s3, f"runs/tune-digits-asha/{run_id}/status.json"))["state"] == "succeeded"
    rows = list(csv.DictReader(io.StringIO(read(s3, f"runs/tune-digits-asha/{run_id}/results.csv"))))
    assert len(rows) == 2 and all(r["status"] == "completed" for r in rows), rows
    for row in rows:  # each trial's own run folder, published by the trial; its checkpoints by Tune
        trial = f"trials/{row['trial_id']}"
        for name in ("history.jsonl", "starts.jsonl", "completed", "data_info.json", "model/model.safetensors"):
            assert f"{trial}/{name}" in files, (trial, name, sorted(files))
        assert any(f.startswith(f"tune/{row['trial_id']}/checkpoint_") for f in files), sorted(files)
        epochs = history(s3, f"tune-digits-asha/{run_id}/{trial}")
        assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2]
    best = yaml.safe_load(read(s3, f"runs/tune-digits-asha/{run_id}/best.yaml"))
    assert "tune" not in best and best["output_dir"] == s3["uri"]
    assert f"s3://steward-runs/runs/tune-digits-asha/{run_id}" in " ".join(out.stdout.split())


@pytest.mark.slow
def test_runs_lists_the_sweep_and_evaluate_and_serve_read_its_model_from_s3(s3, swept, tmp_path):
    _, run_id = swept
    metrics = json.loads(read(s3, f"runs/tune-digits-asha/{run_id}/metrics.json"))
    out = steward(s3, "runs", "--storage", s3["uri"])
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if run_id in line)
    assert "succeeded" in row and f"accuracy={metrics['overall']['accuracy']:.4f}" in row
    out = steward(s3, "evaluate", join(s3["uri"], "tune-digits-asha", run_id))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{metrics['overall']['accuracy']:.4f}" in out.stdout
    staged = s3["cache"] / "runs" / "s3" / "steward-runs" / "runs" / "tune-digits-asha" / run_id
    assert (staged / "model" / "model.json").exists()
    assert not (staged / "tune").exists() and not (staged / "trials").exists()  # checkpoints stay in the bucket
    exported = tmp_path / "serve.yaml"
    out = steward(
        s3,
        "serve",
        JOBS / "tune-digits-asha.yaml",
        "--set",
        "serve={route_prefix: /digits}",
        "--run",
        join(s3["uri"], "tune-digits-asha", run_id),
        "--export",
        exported,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(staged) in exported.read_text()  # the sweep's model, downloaded to serve


@pytest.mark.slow
def test_an_interrupted_sweep_in_s3_resumes_without_rerunning_finished_trials(s3):
    name = "tune-resume"
    # 4 trials one at a time: when the first has finished, the 3 left (~1 s each) outlast the poll and Ctrl+C lands
    # mid-sweep (with 2, the second could finish before the poll saw the first, and the sweep ended uninterrupted)
    overrides = sets(f"name={name}", *SWEEP, "tune.num_samples=4", "tune.max_concurrent_trials=1")
    args = [*STEWARD, "tune", str(JOBS / "tune-digits-asha.yaml"), *overrides, *sets(f"output_dir={s3['uri']}")]
    first = subprocess.Popen(args, cwd=ROOT, env=s3["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not any(p.endswith("/completed") for p in stored(s3, f"runs/{name}")):  # the first trial finished
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    (run_id,) = run_ids(s3, name)
    run_uri = join(s3["uri"], name, run_id)
    assert first.returncode == 130 and f"--resume {run_uri}" in " ".join(err.split()), out + err  # Ctrl-C
    assert json.loads(read(s3, f"runs/{name}/{run_id}/status.json"))["state"] == "interrupted"
    done = [p.split("/")[1] for p in stored(s3, f"runs/{name}/{run_id}") if p.endswith("/completed")]

    # The spec's own output_dir (runs) is left as is: the sweep's URI says where it lives and where it goes on.
    again = steward(s3, "tune", JOBS / "tune-digits-asha.yaml", *overrides, "--resume", run_uri)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = list(csv.DictReader(io.StringIO(read(s3, f"runs/{name}/{run_id}/results.csv"))))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows), rows
    assert json.loads(read(s3, f"runs/{name}/{run_id}/status.json"))["state"] == "succeeded"
    for trial_id in done:  # a finished trial trained no epoch again
        epochs = history(s3, f"{name}/{run_id}/trials/{trial_id}")
        assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1, 2], epochs
        # Ctrl+C can land after a trial finished but before Tune recorded it: Tune then restores it from the last
        # checkpoint it recorded of it
        starts = [
            json.loads(line) for line in read(s3, f"runs/{name}/{run_id}/trials/{trial_id}/starts.jsonl").splitlines()
        ]
        assert all(f"/tune/{trial_id}/checkpoint_" in s["from"] for s in starts[1:]), starts


def put(s3, run, name, text):
    with s3["fs"].open_output_stream(f"steward-runs/runs/{run}/{name}") as out:
        out.write(text.encode())


def stored_run(s3, job):
    """A run of `job` in the bucket that never reached a checkpoint: its spec and status, no train/ or tune/."""
    spec = load_job(JOBS / job, [f"output_dir={s3['uri']}"])
    put(s3, f"{spec.name}/20260101-000000-none", "spec.yaml", yaml.safe_dump(spec.model_dump(mode="json")))
    put(s3, f"{spec.name}/20260101-000000-none", "status.json", '{"state": "failed", "started": 0}')
    return join(s3["uri"], spec.name, "20260101-000000-none")


def test_a_run_that_cannot_be_resumed_is_refused_naming_resume_and_the_fix(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("STEWARD_CACHE", str(s3["cache"]))
    train_run, sweep_run = stored_run(s3, "quickstart.yaml"), stored_run(s3, "tune-digits-asha.yaml")
    cases = {
        ("train", "quickstart.yaml", train_run): "no checkpoint to continue from",
        ("train", "quickstart.yaml", join(s3["uri"], "quickstart", "nosuch")): "no run there (no status.json)",
        ("train", "digits-lstm.yaml", train_run): "not a run of this spec's `digits-lstm`",
        ("tune", "tune-digits-asha.yaml", sweep_run): "no saved sweep state to continue from",
        ("tune", "tune-digits-asha.yaml", train_run): "not a run of this spec's `tune-digits-asha`",
        ("train", "quickstart.yaml", str(tmp_path)): "not a run folder (no spec.yaml)",
    }
    for (verb, job, target), message in cases.items():  # in this process: none of them gets as far as Ray
        out = CliRunner().invoke(app, [verb, str(JOBS / job), "--resume", target])
        said = " ".join(out.stderr.split())  # rich wraps lines at the runner's 80 columns
        assert out.exit_code == 2 and message in said and f"--resume {target}" in said, (target, out.stderr)
