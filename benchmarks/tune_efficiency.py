"""Sweep efficiency, side by side in one run: Tune's bookkeeping overhead, and ASHA against random search.

    python benchmarks/tune_efficiency.py [--bookkeeping-trials 30] [--trials 8] [--budget 9] [--target 0.98]

(a) Bookkeeping, as Ray's own scalability test measures it (release/tune_tests/scalability_tests, "bookkeeping
    overhead": trials of 1 s reporting once, actors reused): N such trials at concurrency 2 through raw Ray Tune;
    observed wall time / ideal (N x 1 s / 2). Interleaved with two harder cells: 10 reports of 0.1 s per trial
    (each report is a round trip through Tune's controller), and the same with steward's Tune-side setup (its
    live trial table, its result loggers), so steward's own share shows as the difference.
    A steward trial is not a function but a whole Ray Train run (a controller and worker actors), so steward's path
    is measured as well: N trials of 1 digits-CNN epoch through steward's sweep; its fixed cost per trial is the
    wall time per slot minus the epoch's own training time.
(b) ASHA vs random search on the digits CNN (jobs/tune-digits-asha.yaml): the same seeded trials (the same sampled
    configs), 2 at a time, each allowed --budget epochs; ASHA (grace 1, reduction 3) stops the weakest at epochs
    1 and 3. Measured: wall time until any trial first reports --target validation accuracy, and the whole sweep.
Writes benchmarks/results/tune_efficiency.json and prints the table.
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from ray import tune
from rich.console import Console
from rich.table import Table

from steward.runs import create_run
from steward.spec import load_job
from steward.train.curves import read_history
from steward.train.launch import connect
from steward.tune.launch import TRIALS, sweep, tune_callbacks, tune_environment
from steward.tune.report import LiveTable

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "tune-digits-asha.yaml"
ASHA = "{name: asha, grace_period: 1, reduction_factor: 3}"


def sleeper(config: dict) -> None:
    for step in range(config["reports"]):
        time.sleep(1 / config["reports"])
        tune.report({"step": step})


# (a)'s cells: reports per 1 s trial, and whether Tune runs with steward's Tune-side setup (its callbacks/loggers)
CELLS = {"ray's test: 1 report/trial": (1, False), "10 reports/trial": (10, False),
         "10 reports/trial, steward's tune setup": (10, True)}  # fmt: skip


def bookkeeping(trials: int, tmp: Path, reports: int, steward: bool) -> float:
    """Wall time of `trials` 1 s trials at concurrency 2 / the ideal trials x 1 s / 2."""
    callbacks = tune_callbacks([LiveTable("step", ["i"])]) if steward else []
    tuner = tune.Tuner(
        sleeper,
        param_space={"i": tune.grid_search(list(range(trials))), "reports": reports},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp), name=f"bookkeeping-{time.time_ns()}", verbose=0,
                                  callbacks=callbacks),
    )  # fmt: skip
    started = time.monotonic()
    with tune_environment() if steward else contextlib.nullcontext():
        tuner.fit()
    return (time.monotonic() - started) / (trials / 2)


def steward_sweep(tmp: Path, name: str, overrides: list[str]) -> tuple[float, list[dict], Path]:
    """Run a steward sweep; its wall time, every report as (seconds since start, val_accuracy), and its run folder."""
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
    return wall, reports, run_dir


def steward_trial_cost(tmp: Path, trials: int) -> dict:
    """Steward's fixed cost per trial: wall time per slot of 1-epoch trials, less the epoch's own training time."""
    common = ["train.epochs=1", f"tune.num_samples={trials}", "tune.max_concurrent_trials=2"]
    wall, _, run_dir = steward_sweep(tmp, "start", [*common, "tune.scheduler={name: fifo}"])
    epochs = [r["epoch_seconds"] for h in (run_dir / TRIALS).glob("*/history.jsonl") for r in read_history(h)
              if r["kind"] == "epoch"]  # fmt: skip
    per_slot = wall / (trials / 2)
    return {"trials": trials, "wall_s": wall, "per_slot_s": per_slot, "epoch_s": statistics.mean(epochs),
            "fixed_cost_s": per_slot - statistics.mean(epochs)}  # fmt: skip


def time_to(reports: list[dict], target: float) -> float | None:
    hits = [r["t"] for r in reports if r["val_accuracy"] >= target]
    return min(hits) if hits else None


def asha_vs_random(tmp: Path, trials: int, budget: int, target: float) -> dict:
    """Both sweeps over the same seeded configs; wall time to `target` and in all, and each trial's best accuracy."""
    common = [f"train.epochs={budget}", f"tune.num_samples={trials}", "tune.max_concurrent_trials=2"]
    runs = {}
    for name, scheduler in (("random", "{name: fifo}"), ("asha", ASHA)):
        wall, reports, _ = steward_sweep(tmp, name, [*common, f"tune.scheduler={scheduler}"])
        runs[name] = {"wall_s": wall, "time_to_target_s": time_to(reports, target), "reports": len(reports),
                      "best_val_accuracy": max(r["val_accuracy"] for r in reports)}  # fmt: skip
        Console().print(f"{name}: {runs[name]}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bookkeeping-trials", type=int, default=30, help="1 s trials for (a)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats of (a)'s two cells")
    parser.add_argument("--steward-trials", type=int, default=6, help="1-epoch steward trials for the fixed cost")
    parser.add_argument("--trials", type=int, default=8, help="trials of the ASHA / random budget")
    parser.add_argument("--budget", type=int, default=9, help="epochs a trial may run")
    parser.add_argument("--target", type=float, default=0.98, help="validation accuracy to reach")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_efficiency.json")
    args = parser.parse_args()
    connect(None, load_job(JOB))
    started, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="steward-tune-bench-") as folder:
        tmp = Path(folder)
        cells: dict[str, list[float]] = {cell: [] for cell in CELLS}
        for _ in range(args.repeats):  # interleaved: drift of a shared machine hits every cell alike
            for cell, ratios in cells.items():
                ratios.append(bookkeeping(args.bookkeeping_trials, tmp, *CELLS[cell]))
        Console().print(f"bookkeeping wall / ideal: {cells}")
        cost = steward_trial_cost(tmp, args.steward_trials)
        Console().print(f"steward trial: {cost}")
        runs = asha_vs_random(tmp, args.trials, args.budget, args.target)
    result = {
        "bookkeeping": {"trials": args.bookkeeping_trials, "ratios": cells,
                        "median": {c: statistics.median(r) for c, r in cells.items()}},
        "steward_trial": cost,
        "target_val_accuracy": args.target,
        "sweeps": {"trials": args.trials, "budget_epochs": args.budget, "asha": ASHA, **runs},
        "asha_speedup_to_target": _ratio(runs["random"]["time_to_target_s"], runs["asha"]["time_to_target_s"]),
        "asha_speedup_whole_sweep": runs["random"]["wall_s"] / runs["asha"]["wall_s"],
        "load_average_at_start": load,
        "benchmark_s": time.monotonic() - started,
    }  # fmt: skip
    Console().print(summary(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.out}")


def summary(result: dict) -> Table:
    book, cost, sweeps = result["bookkeeping"], result["steward_trial"], result["sweeps"]
    table = Table(title=f"Sweep efficiency (2 trials at a time; load average {result['load_average_at_start']:.1f})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for cell, median in book["median"].items():
        runs = ", ".join(f"{r:.3f}" for r in book["ratios"][cell])
        table.add_row(f"(a) {cell}, {book['trials']} x 1 s trials: wall / ideal (target <= 1.10)",
                      f"{median:.3f} ({runs})")  # fmt: skip
    table.add_row(f"    steward trial (a Ray Train run): fixed cost per trial, s ({cost['trials']} trials)",
                  f"{cost['fixed_cost_s']:.1f}")  # fmt: skip
    for name in ("random", "asha"):
        run, reach = sweeps[name], sweeps[name]["time_to_target_s"]
        table.add_row(f"(b) {name}: whole sweep s / to val_accuracy {result['target_val_accuracy']} s",
                      f"{run['wall_s']:.0f} / {'never' if reach is None else f'{reach:.0f}'}")  # fmt: skip
    speedup = result["asha_speedup_to_target"]
    table.add_row("    ASHA speed-up to target (target >= 2)", "n/a" if speedup is None else f"{speedup:.2f}x")
    table.add_row("    ASHA speed-up, whole sweep", f"{result['asha_speedup_whole_sweep']:.2f}x")
    return table


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


if __name__ == "__main__":
    main()
