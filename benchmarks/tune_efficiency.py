"""Sweep efficiency, side by side in one run: Tune's bookkeeping overhead, and ASHA against random search.

    python benchmarks/tune_efficiency.py [--trials 16] [--budget 12]

(a) Bookkeeping: N trials of a fixed 1 s workload (10 reports of 0.1 s) at concurrency 2 through Ray Tune (actors
    reused, as Ray's own scalability test does); observed wall time / ideal (N x 1 s / 2); Ray measured 1.14.
    For scale, N steward trials of 1 epoch each (a Ray Train run per trial) give steward's per-trial start cost.
(b) ASHA vs random search on the digits CNN (jobs/tune-digits-asha.yaml), the same seeded trial budget, 2 trials at
    a time: wall time until any trial first reports the target validation accuracy, and for the whole sweep.
Writes benchmarks/results/tune_efficiency.json and prints the table.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from ray import tune
from rich.console import Console
from rich.table import Table

from steward.runs import create_run
from steward.spec import load_job
from steward.train.launch import connect
from steward.tune.launch import sweep

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "tune-digits-asha.yaml"


def sleeper(config: dict) -> None:
    for step in range(10):
        time.sleep(0.1)
        tune.report({"step": step})


def bookkeeping(trials: int, tmp: Path) -> dict:
    """Wall time of `trials` 1 s trials at concurrency 2, against the ideal trials x 1 s / 2."""
    tuner = tune.Tuner(
        sleeper,
        param_space={"i": tune.grid_search(list(range(trials)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp), name="bookkeeping", verbose=0),
    )
    started = time.monotonic()
    tuner.fit()
    wall = time.monotonic() - started
    return {"trials": trials, "wall_s": wall, "ideal_s": trials / 2, "ratio": wall / (trials / 2)}


def steward_sweep(tmp: Path, name: str, overrides: list[str]) -> tuple[float, list[dict]]:
    """Run a steward sweep; its wall time and, per trial, (seconds since start, val_accuracy) of every report."""
    spec = load_job(JOB, [f"output_dir={tmp / name}", *overrides])
    run_dir = create_run(spec)
    started = time.time()
    grid = sweep(spec, run_dir, None, [])
    wall = time.time() - started
    reports = []
    for i in range(len(grid)):
        frame = grid[i].metrics_dataframe
        points = zip(frame["timestamp"], frame["val_accuracy"], strict=True)
        reports += [{"t": ts - started, "val_accuracy": acc} for ts, acc in points]
    return wall, reports


def time_to(reports: list[dict], target: float) -> float | None:
    hits = [r["t"] for r in reports if r["val_accuracy"] >= target]
    return min(hits) if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials of the ASHA / random budget")
    parser.add_argument("--bookkeeping-trials", type=int, default=40, help="1 s trials for (a)")
    parser.add_argument("--budget", type=int, default=12, help="epochs a trial may run")
    parser.add_argument("--target", type=float, default=0.985, help="validation accuracy to reach")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_efficiency.json")
    args = parser.parse_args()
    console = Console()
    connect(None, load_job(JOB))
    common = [f"train.epochs={args.budget}", f"tune.num_samples={args.trials}", "tune.max_concurrent_trials=2"]
    with tempfile.TemporaryDirectory(prefix="steward-tune-bench-") as folder:
        tmp = Path(folder)
        book = bookkeeping(args.bookkeeping_trials, tmp)
        console.print(f"bookkeeping: {book}")
        one_epoch, _ = steward_sweep(tmp, "start", [*common, "train.epochs=1", "tune.scheduler={name: fifo}"])
        runs = {}
        asha = "{name: asha, grace_period: 1, reduction_factor: 3}"
        for name, scheduler in (("random", "{name: fifo}"), ("asha", asha)):
            wall, reports = steward_sweep(tmp, name, [*common, f"tune.scheduler={scheduler}"])
            runs[name] = {"wall_s": wall, "time_to_target_s": time_to(reports, args.target)}
            console.print(f"{name}: {runs[name]}")
    result = {
        "bookkeeping": book,
        "steward_trial_start_s": one_epoch / (args.trials / 2),
        "target_val_accuracy": args.target,
        "sweeps": runs,
        "asha_speedup_to_target": _ratio(runs["random"]["time_to_target_s"], runs["asha"]["time_to_target_s"]),
        "asha_speedup_whole_sweep": runs["random"]["wall_s"] / runs["asha"]["wall_s"],
    }
    table = Table(title=f"Sweep efficiency ({args.trials} trials, 2 at a time)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("Tune bookkeeping: wall / ideal (target <= 1.10)", f"{book['ratio']:.3f}")
    table.add_row("steward trial of 1 epoch (Ray Train start incl.), s", f"{result['steward_trial_start_s']:.1f}")
    for name, run in runs.items():
        reach = run["time_to_target_s"]
        table.add_row(f"{name}: whole sweep s / to val_accuracy {args.target} s",
                      f"{run['wall_s']:.0f} / {'never' if reach is None else f'{reach:.0f}'}")  # fmt: skip
    speedup = result["asha_speedup_to_target"]
    table.add_row("ASHA speed-up to target (target >= 2)", "n/a" if speedup is None else f"{speedup:.2f}x")
    table.add_row("ASHA speed-up, whole sweep", f"{result['asha_speedup_whole_sweep']:.2f}x")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.out}")


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


if __name__ == "__main__":
    main()
