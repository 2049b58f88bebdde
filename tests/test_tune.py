"""Ray tier: real Ray Tune sweeps whose trials are real Ray Train runs (DDP and 2-worker DeepSpeed), on 2 CPUs."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from steward.runs import create_run, read_history
from steward.spec import load_job
from steward.stages import keep_sweep_model, train_model
from steward.tune.finish import tune_job
from steward.tune.launch import TRIALS
from tests.conftest import JOBS, ROOT

pytestmark = pytest.mark.slow


def sweep(tmp_path, job, *overrides):
    spec = load_job(JOBS / job, [f"output_dir={tmp_path}", *overrides])
    run_dir = create_run(spec)
    found = tune_job(spec, run_dir)
    result = keep_sweep_model(spec, found, run_dir)
    return spec, run_dir, result, found.rows, found.best


def starts(run_dir, trial_id):
    path = run_dir / TRIALS / trial_id / "starts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_asha_stops_trials_early_and_best_yaml_retrains_to_the_reported_metric(ray_local, tmp_path):
    spec, run_dir, result, rows, best = sweep(
        tmp_path,
        "tune-digits-asha.yaml",
        "train.epochs=4",
        "tune.num_samples=4",
        "tune.max_concurrent_trials=1",
        "tune.scheduler={name: asha, grace_period: 1, reduction_factor: 2}",
    )
    # One trial at a time, so every rung already holds the earlier trials' results when a trial reaches it.
    pruned = [r for r in rows if r.status == "pruned"]
    assert len(rows) == 4 and pruned, [(r.status, r.iterations) for r in rows]
    assert all(r.iterations < 4 for r in pruned) and best.iterations == 4
    # one-worker trials train in Tune's trial process: no Ray Train run (its folder train-<id>) in any trial
    assert not list((run_dir / TRIALS).glob("*/train-*"))
    assert {r.trial_id for r in rows} == {row["trial_id"] for row in csv.DictReader((run_dir / "results.csv").open())}
    for artifact in ("trials.png", "best.yaml", "model/model.safetensors", "metrics.json", "curves.png"):
        assert (run_dir / artifact).exists(), artifact
    assert result["overall"]["accuracy"] > 0.8

    # best.yaml is a plain spec: training it again reproduces the best trial's validation accuracy.
    again = load_job(run_dir / "best.yaml", [f"output_dir={tmp_path / 'again'}"])
    assert again.tune is None and again.train.optimizer.lr == best.config["train.optimizer.lr"]
    retrain_dir = create_run(again)
    train_model(again, retrain_dir)
    final = [r for r in read_history(retrain_dir / "history.jsonl") if r["kind"] == "epoch"][-1]
    # Same seed, data, config and single worker: only float summation order may differ; 0.02 is ~4 of 179 rows.
    assert abs(final["val_accuracy"] - best.metric) <= 0.02, (final["val_accuracy"], best.metric)


def test_grid_over_zero_stage_runs_two_worker_deepspeed_trials(ray_local, tmp_path):
    spec, run_dir, result, rows, best = sweep(
        tmp_path,
        "tune-digits-asha.yaml",
        "train.epochs=1",
        "distributed.num_workers=2",
        "distributed.strategy=deepspeed",
        "tune.search=grid",
        "tune.num_samples=1",
        "tune.scheduler={name: fifo}",
        "tune.search_space={distributed.zero_stage: {grid: [1, 2]}}",
    )
    assert sorted(r.config["distributed.zero_stage"] for r in rows) == [1, 2]
    assert all(r.status == "completed" for r in rows)
    for row in rows:
        history = read_history(run_dir / TRIALS / row.trial_id / "history.jsonl")
        assert history[0]["kind"] == "start" and history[0]["workers"] == 2
        assert list((run_dir / TRIALS / row.trial_id).glob("train-*")), "a two-worker trial is a Ray Train run"


def test_one_worker_deepspeed_trials_train_one_after_another_in_a_reused_trial_process(ray_local, tmp_path):
    spec, run_dir, result, rows, best = sweep(
        tmp_path,
        "tune-digits-asha.yaml",
        "train.epochs=1",
        "distributed.strategy=deepspeed",
        "tune.search=grid",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tune.scheduler={name: fifo}",
        "tune.search_space={distributed.zero_stage: {grid: [1, 2]}}",
    )
    # the second trial joins the process group (and DeepSpeed's hold on it) that the first one left behind
    assert sorted(r.config["distributed.zero_stage"] for r in rows) == [1, 2]
    assert all(r.status == "completed" for r in rows), [(r.status, r.error) for r in rows]
    assert not list((run_dir / TRIALS).glob("*/train-*"))


def test_optuna_with_median_stopping_then_retrain_best_on_train_and_validation(ray_local, tmp_path):
    spec, run_dir, result, rows, best = sweep(
        tmp_path,
        "tune-digits-asha.yaml",
        "train.epochs=3",
        "tune.num_samples=4",
        "tune.search=optuna",
        "tune.on_finish=retrain_best",
        "tune.seed=3",
        "tune.scheduler={name: median_stopping, grace_period: 1, min_samples_required: 2}",
    )
    assert len(rows) == 4 and len({r.config["train.optimizer.lr"] for r in rows}) == 4
    assert all(r.status in ("completed", "pruned") for r in rows) and best.status == "completed"
    # retrain_best: the best config again, on train + validation, for as many epochs as the best trial ran
    epochs = [r for r in read_history(run_dir / "history.jsonl") if r["kind"] == "epoch"]
    assert len(epochs) == best.iterations and not any("val_accuracy" in r for r in epochs)
    assert (run_dir / "model" / "model.safetensors").exists() and result["overall"]["accuracy"] > 0.8


def test_pbt_copies_a_better_trial_and_perturbs_its_config(ray_local, tmp_path):
    spec, run_dir, result, rows, best = sweep(
        tmp_path,
        "tune-lstm-pbt.yaml",
        "train.epochs=3",
        "tune.num_samples=2",
        # synch: these trials take ~2 s, less than their start-up jitter, so asynchronous PBT may never see
        # both trials alive at an interval. Interval 2 of 3 epochs: no perturbation at the final result.
        "tune.scheduler={name: pbt, perturbation_interval: 2, quantile_fraction: 0.5, synch: true}",
        "tune.search_space={train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-2]}}",
    )
    exploited = [
        (row.trial_id, start)
        for row in rows
        for start in starts(run_dir, row.trial_id)[1:]
        if start["from"] and row.trial_id not in start["from"]
    ]
    assert exploited, [starts(run_dir, r.trial_id) for r in rows]
    trial_id, start = exploited[0]
    first = starts(run_dir, trial_id)[0]
    assert start["config"]["train.optimizer.lr"] != first["config"]["train.optimizer.lr"]
    history = read_history(run_dir / TRIALS / trial_id / "history.jsonl")
    resumed = [r for r in history if r["kind"] == "start" and r["from"]]
    assert resumed and resumed[0]["epoch"] >= 1  # continued from the copied checkpoint's epoch, not from scratch


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path):
    args = [
        sys.executable,
        "-m",
        "steward",
        "tune",
        str(JOBS / "tune-digits-asha.yaml"),
        "--set",
        f"output_dir={tmp_path}",
        "--set",
        "train.epochs=2",
        "--set",
        "tune.num_samples=4",
        "--set",
        "tune.max_concurrent_trials=1",
        "--set",
        "tune.scheduler={name: fifo}",
    ]
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # 4 trials one at a time: Ctrl+C after the first lands with 3 (~1 s each) left
    while not list(tmp_path.glob(f"*/*/{TRIALS}/*/completed")):  # the first trial finished
        assert time.monotonic() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 130 and "--resume" in err, out + err  # 130: ended by Ctrl-C (SIGINT)
    [run_dir] = tmp_path.glob("*/*/spec.yaml")
    run_dir = run_dir.parent
    assert json.loads((run_dir / "status.json").read_text())["state"] == "interrupted"
    done_before = {p.parent.name for p in run_dir.glob(f"{TRIALS}/*/completed")}

    again = subprocess.run([*args, "--resume", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = list(csv.DictReader((run_dir / "results.csv").open()))
    assert len(rows) == 4 and all(r["status"] == "completed" for r in rows)
    for trial_id in done_before:  # finished trials were not trained again from scratch
        history = read_history(run_dir / TRIALS / trial_id / "history.jsonl")
        assert [r["epoch"] for r in history if r["kind"] == "epoch"] == [1, 2], history
        # Ctrl+C can land after a trial finished but before Tune recorded it: Tune then restores it from the last
        # checkpoint it recorded of it
        assert all(f"/tune/{trial_id}/checkpoint_" in s["from"] for s in starts(run_dir, trial_id)[1:])
    # tracked in the embedded MLflow store: one run for the sweep, interrupted then continued, a child per trial
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    [sweep] = client.search_runs([client.get_experiment_by_name("tune-digits-asha").experiment_id],
                                 "tags.`steward.kind` = 'sweep'")  # fmt: skip
    assert sweep.info.status == "FINISHED" and sweep.data.tags["steward.state"] == "succeeded"
    children = client.search_runs([sweep.info.experiment_id], f"tags.mlflow.parentRunId = '{sweep.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(r["trial_id"] for r in rows)
    assert all(len(client.get_metric_history(c.info.run_id, "val_accuracy")) == 2 for c in children)
