"""After a sweep: one row per trial, the best trial, what the run keeps (best.yaml, results.csv), and how the
best trial becomes the run's model (steward.stages does it)."""

import csv
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.experiment import Trial

from steward import storage
from steward.runs import run_uri
from steward.spec import JobSpec
from steward.train.loop import HISTORY
from steward.tune.launch import COMPLETED, TRIALS, SweepInterrupted, TuneError, sweep
from steward.tune.report import LiveTable, TrialRow, plot_trials
from steward.tune.space import TIME_ATTR, trial_spec


def trial_rows(grid: tune.ResultGrid, metric: str, run_dir: Path) -> list[TrialRow]:
    """A row per trial, in trial order, with its metric curve (one point per epoch)."""
    rows = []
    for result in (grid[i] for i in range(len(grid))):
        trial_id = Path(result.path).name  # the trial's folder is named by its id (a PBT copy reports its donor's)
        frame = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if frame is not None and metric in frame:
            points = zip(frame[TIME_ATTR], frame[metric], strict=True)
            curve = [(int(i), float(v)) for i, v in points if not math.isnan(v)]
        completed = (run_dir / TRIALS / trial_id / COMPLETED).exists()
        status = "error" if result.error else "completed" if completed else "pruned"
        rows.append(
            TrialRow(
                trial_id=trial_id,
                status=status,
                config=dict(result.config or {}),
                iterations=curve[-1][0] if curve else 0,
                metric=curve[-1][1] if curve else None,
                curve=curve,
                error=str(result.error).strip().splitlines()[-1] if result.error else None,
            )
        )
    return sorted(rows, key=lambda r: r.trial_id)


def best_row(rows: list[TrialRow], mode: str) -> TrialRow:
    """The completed trial with the best final metric (a pruned trial has no final model to keep)."""
    completed = [r for r in rows if r.status == "completed" and r.metric is not None]
    if not completed:
        errors = sorted({r.error for r in rows if r.error})
        raise TuneError("no trial completed" + (f"; trial errors: {'; '.join(errors)}" if errors else ""))
    return (max if mode == "max" else min)(completed, key=lambda r: r.metric or 0.0)


def write_results(rows: list[TrialRow], spec: JobSpec, best: TrialRow, run_dir: Path) -> JobSpec:
    """results.csv (a row per trial) and best.yaml (the best trial's full spec, ready for `steward train`)."""
    assert spec.tune is not None
    paths = list(spec.tune.search_space)
    with (run_dir / "results.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["trial_id", "status", "iterations", spec.tune.metric, *paths, "error"])
        for r in rows:
            writer.writerow([r.trial_id, r.status, r.iterations, r.metric, *(r.config.get(p) for p in paths), r.error])
    best_spec = best_trial_spec(spec, best)
    (run_dir / "best.yaml").write_text(
        f"# Best trial {best.trial_id} of the sweep in {run_dir} ({spec.tune.metric} = {best.metric:.4f}).\n"
        + yaml.safe_dump(best_spec.model_dump(mode="json", exclude={"tune"}), sort_keys=False)
    )
    return best_spec


def best_trial_spec(spec: JobSpec, best: TrialRow) -> JobSpec:
    assert spec.tune is not None
    return trial_spec(spec.model_dump(mode="json", exclude={"tune"}), best.config, spec.tune)


@dataclass(frozen=True)
class SweepResult:
    """What a finished sweep leaves: a row per trial, the best trial, and the full spec of the best trial."""

    rows: list[TrialRow]
    best: TrialRow
    best_spec: JobSpec
    trials_dir: Path


def retrain_spec(sweep: SweepResult) -> JobSpec:
    """The best trial's config, trained on train + validation for as many epochs as the trial ran."""
    best_spec = sweep.best_spec
    update = {"epochs": sweep.best.iterations, "include_validation": True, "early_stopping": None}
    retrain = best_spec.model_copy(update={"train": best_spec.train.model_copy(update=update)})
    return JobSpec.model_validate(retrain.model_dump(mode="json"))


def copy_best_trial(sweep: SweepResult, run_dir: Path) -> None:
    """The best trial's model and history become the run's own."""
    trial_dir = sweep.trials_dir / sweep.best.trial_id
    shutil.copytree(trial_dir / "model", run_dir / "model", dirs_exist_ok=True)
    shutil.copy(trial_dir / HISTORY, run_dir / HISTORY)


def unfinished_trials(grid: tune.ResultGrid) -> int:
    """Trials that had not finished when the sweep stopped, by the state Tune saved (to run_dir/tune or the URI).

    The grid cannot tell: after Ctrl+C Tune saves its state, then stops the running trials and marks them
    terminated, like the trials that ended.
    """
    saved = ExperimentAnalysis(grid.experiment_path, storage_filesystem=grid.filesystem)
    return sum(trial.status not in (Trial.TERMINATED, Trial.ERROR) for trial in saved.trials)


def fetch_trials(sweep_uri: str, run_dir: Path) -> None:
    """Cluster storage: every trial's run folder as its node published it, checkpoints left behind, into run_dir."""
    trials = storage.join(sweep_uri, TRIALS)
    for trial_id in storage.folders(trials, "output_dir"):
        storage.download(storage.join(trials, trial_id), run_dir / TRIALS / trial_id)


def tune_job(spec: JobSpec, run_dir: Path, address: str | None = None, resume: bool = False) -> SweepResult:
    """Sweep (or continue one) into run_dir on the Ray at `address` and write its results (results.csv, best.yaml,
    trials.png); SweepInterrupted when trials are left unfinished."""
    assert spec.tune is not None
    live = LiveTable(spec.tune.metric, list(spec.tune.search_space))
    started = time.monotonic()
    try:
        grid = sweep(spec, run_dir, address, [live], resume)
    finally:
        live.stop()
    uri = run_uri(spec, run_dir)
    if uri:
        fetch_trials(uri, run_dir)
    rows = trial_rows(grid, spec.tune.metric, run_dir)
    # Ctrl+C leaves trials unfinished, or not yet created (Tune creates trials as slots free up).
    out_of_time = spec.tune.time_budget_s is not None and time.monotonic() - started >= spec.tune.time_budget_s
    missing = len(grid) < spec.tune.num_trials and not out_of_time
    stopped = not out_of_time and unfinished_trials(grid) > 0
    if missing or stopped or grid.num_terminated + grid.num_errors < len(grid):
        raise SweepInterrupted(f"sweep interrupted; continue it with: steward tune SPEC --resume {uri or run_dir}")
    best = best_row(rows, spec.tune.mode)
    best_spec = write_results(rows, spec, best, run_dir)
    plot_trials(rows, spec.tune.metric, run_dir / "trials.png")
    return SweepResult(rows, best, best_spec, run_dir / TRIALS)
