"""After a sweep: one row per trial, the best trial, and what the run keeps (best.yaml, results.csv, the model)."""

import csv
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from steward.evaluate.run import evaluate_model, write_metrics
from steward.spec import JobSpec
from steward.train.curves import plot_history
from steward.train.launch import train_job
from steward.tune.launch import TRIALS, TuneError
from steward.tune.space import TIME_ATTR, trial_spec


@dataclass
class TrialRow:
    """What one trial did: completed (ran to its end), pruned (stopped by the scheduler or budget), or error."""

    trial_id: str
    status: str
    config: dict[str, Any]
    iterations: int = 0
    metric: float | None = None
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def trial_rows(grid: tune.ResultGrid, metric: str, run_dir: Path) -> list[TrialRow]:
    """A row per trial, in trial order, with its metric curve (one point per epoch)."""
    rows = []
    for result in (grid[i] for i in range(len(grid))):
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        frame = result.metrics_dataframe
        curve: list[tuple[int, float]] = []
        if frame is not None and metric in frame:
            points = zip(frame[TIME_ATTR], frame[metric], strict=True)
            curve = [(int(i), float(v)) for i, v in points if not math.isnan(v)]
        finished = (run_dir / TRIALS / trial_id / "model").exists()
        status = "error" if result.error else "completed" if finished else "pruned"
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
    """The completed trial with the best final metric (a pruned trial has no exported model to keep)."""
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


def finish(spec: JobSpec, best_spec: JobSpec, best: TrialRow, run_dir: Path, address: str | None) -> dict:
    """Make the run's model from the sweep (keep the best trial's, or retrain its config on train + validation)."""
    assert spec.tune is not None
    if spec.tune.on_finish == "retrain_best":
        update = {"epochs": best.iterations, "include_validation": True, "early_stopping": None}
        retrain = best_spec.model_copy(update={"train": best_spec.train.model_copy(update=update)})
        retrain = JobSpec.model_validate(retrain.model_dump(mode="json"))
        return train_job(retrain, run_dir, address)
    trial_dir = run_dir / TRIALS / best.trial_id
    shutil.copytree(trial_dir / "model", run_dir / "model", dirs_exist_ok=True)
    shutil.copy(trial_dir / "history.jsonl", run_dir / "history.jsonl")
    plot_history(run_dir / "history.jsonl", run_dir / "curves.png")
    result = evaluate_model(run_dir / "model", best_spec)
    write_metrics(run_dir, result)
    return result
