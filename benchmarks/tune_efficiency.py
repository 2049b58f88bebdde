"""Sweep efficiency, side by side in one run: Tune's bookkeeping overhead, and ASHA against random search.

    python benchmarks/tune_efficiency.py [--bookkeeping-trials 10 30] [--trials 12] [--budget 27] [--seeds 0 1 2]

(a) Bookkeeping, as Ray's own scalability test measures it (release/tune_tests/scalability_tests, "bookkeeping
    overhead": 10,000 trials of 1 s reporting once, actors reused): trials of 1 s at concurrency 2 through raw Ray
    Tune, at two sizes. Reported: wall / ideal (N x 1 s / 2) at the larger size, and per trial beyond Tune's fixed
    start-up (the slope between the sizes), which is what Ray's 10,000 trials measure. Interleaved with two harder
    cells: 10 reports of 0.1 s per trial (each report is a round trip through Tune's controller), and the same with
    steward's Tune-side setup (its live trial table, its result loggers), so steward's own share shows as the
    difference.
    Steward's own trials are measured too: N trials of 1 digits-CNN epoch through steward's sweep, with one worker
    (trained in Tune's trial process) and with two (a Ray Train run per trial); a trial's fixed cost is the wall
    time per slot minus the epoch's own training time.
(b) ASHA vs random search on the digits CNN (jobs/tune-digits-asha.yaml), over a realistic search space: learning
    rate over four decades (1e-5 to 1e-1), width 16-128, dropout 0-0.5, so some configs are poor; 30% of the digits
    are held out for validation, so accuracy moves in 0.2% steps. For each seed, both sweeps run the same seeded
    configs in the same order, 2 at a time, each allowed --budget epochs; ASHA (grace 1, reduction 3) stops the
    weakest at epochs 1, 3 and 9. Measured per seed, from the trials' own histories: wall time from the sweep's
    start until any trial first reports each --targets validation accuracy, and the whole sweep; ratios
    random / ASHA, medians over seeds.
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
SPACE = (
    "tune.search_space={train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-1]}, "
    "model.params.hidden_size: {choice: [16, 32, 64, 128]}, model.params.dropout: {uniform: [0.0, 0.5]}}"
)
SPLITS = "data.splits={train: 0.6, validation: 0.3, test: 0.1}"  # 539 validation digits: accuracy in 0.2% steps


def sleeper(config: dict) -> None:
    for step in range(config["reports"]):
        time.sleep(1 / config["reports"])
        tune.report({"step": step})


# (a)'s cells: reports per 1 s trial, and whether Tune runs with steward's Tune-side setup (its callbacks/loggers)
CELLS = {"ray's test: 1 report/trial": (1, False), "10 reports/trial": (10, False),
         "10 reports/trial, steward's tune setup": (10, True)}  # fmt: skip


def bookkeeping(trials: int, tmp: Path, reports: int, steward: bool) -> float:
    """Wall time of `trials` 1 s trials at concurrency 2, seconds."""
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
    return time.monotonic() - started


def bookkeeping_ratios(sizes: tuple[int, int], tmp: Path, reports: int, steward: bool) -> dict[str, float]:
    """Wall / ideal (trials x 1 s / 2) at the larger size, and per trial beyond Tune's start-up (the slope between
    the two sizes: what Ray's 10,000-trial test converges to)."""
    small, large = (bookkeeping(n, tmp, reports, steward) for n in sizes)
    return {"whole": large / (sizes[1] / 2), "per_trial": (large - small) / ((sizes[1] - sizes[0]) / 2)}


def steward_sweep(tmp: Path, name: str, overrides: list[str]) -> tuple[float, list[dict], Path]:
    """Run a steward sweep; its wall time, every epoch's report as (seconds since start, val_accuracy), its folder.

    Report times come from the trials' histories (Tune's own result timestamps are whole seconds).
    """
    spec = load_job(JOB, [f"output_dir={tmp / name}", *overrides])
    run_dir = create_run(spec)
    started = time.time()
    sweep(spec, run_dir, None, [])
    wall = time.time() - started
    epochs = [r for h in (run_dir / TRIALS).glob("*/history.jsonl") for r in read_history(h) if r["kind"] == "epoch"]
    reports = [{"t": r["time"] - started, "val_accuracy": r["val_accuracy"]} for r in epochs]
    return wall, reports, run_dir


def steward_trial_cost(tmp: Path, trials: int, workers: int) -> dict:
    """Steward's fixed cost per trial: wall time per slot of 1-epoch trials, less the epoch's own training time."""
    slots = 2 // workers  # trials at a time on 2 cores
    common = ["train.epochs=1", f"tune.num_samples={trials}", f"tune.max_concurrent_trials={slots}",
              f"distributed.num_workers={workers}"]  # fmt: skip
    wall, _, run_dir = steward_sweep(tmp, f"start-{workers}", [*common, "tune.scheduler={name: fifo}"])
    epochs = [r["epoch_seconds"] for h in (run_dir / TRIALS).glob("*/history.jsonl") for r in read_history(h)
              if r["kind"] == "epoch"]  # fmt: skip
    per_slot = wall / (trials / slots)
    return {"trials": trials, "workers": workers, "wall_s": wall, "per_slot_s": per_slot,
            "epoch_s": statistics.mean(epochs), "fixed_cost_s": per_slot - statistics.mean(epochs)}  # fmt: skip


def time_to(reports: list[dict], target: float) -> float | None:
    hits = [r["t"] for r in reports if r["val_accuracy"] >= target]
    return min(hits) if hits else None


def asha_vs_random(tmp: Path, trials: int, budget: int, targets: list[float], seed: int) -> dict:
    """Both sweeps over the same seeded configs: wall time to each target and in all, and the best accuracy."""
    common = [f"train.epochs={budget}", f"tune.num_samples={trials}", "tune.max_concurrent_trials=2", SPACE, SPLITS,
              f"tune.seed={seed}"]  # fmt: skip
    runs = {}
    for name, scheduler in (("random", "{name: fifo}"), ("asha", ASHA)):
        wall, reports, _ = steward_sweep(tmp, f"{name}-{seed}", [*common, f"tune.scheduler={scheduler}"])
        best = max(r["val_accuracy"] for r in reports)
        runs[name] = {"wall_s": wall, "reports": len(reports), "best_val_accuracy": best,
                      "time_to_s": {str(t): time_to(reports, t) for t in targets}}  # fmt: skip
    runs["speedup_whole_sweep"] = runs["random"]["wall_s"] / runs["asha"]["wall_s"]
    runs["speedup_to"] = {str(t): _ratio(runs["random"]["time_to_s"][str(t)], runs["asha"]["time_to_s"][str(t)])
                          for t in targets}  # fmt: skip
    Console().print(f"seed {seed}: {runs}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bookkeeping-trials", type=int, nargs=2, default=[10, 30], help="(a)'s two sizes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of (a)'s cells")
    parser.add_argument("--steward-trials", type=int, default=4, help="1-epoch steward trials for the fixed cost")
    parser.add_argument("--trials", type=int, default=12, help="trials of the ASHA / random budget")
    parser.add_argument("--budget", type=int, default=27, help="epochs a trial may run")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.98, 0.99], help="validation accuracies")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (config orders)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "tune_efficiency.json")
    args = parser.parse_args()
    connect(None, load_job(JOB))
    started, load = time.monotonic(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="steward-tune-bench-") as folder:
        tmp = Path(folder)
        cells: dict[str, list[dict]] = {cell: [] for cell in CELLS}
        for _ in range(args.repeats):  # interleaved: drift of a shared machine hits every cell alike
            for cell, ratios in cells.items():
                ratios.append(bookkeeping_ratios(args.bookkeeping_trials, tmp, *CELLS[cell]))
        Console().print(f"bookkeeping wall / ideal: {cells}")
        costs = [steward_trial_cost(tmp, args.steward_trials // workers, workers) for workers in (1, 2)]
        Console().print(f"steward trials: {costs}")
        seeds = {str(seed): asha_vs_random(tmp, args.trials, args.budget, args.targets, seed) for seed in args.seeds}
    speedups = {str(t): [r["speedup_to"][str(t)] for r in seeds.values()] for t in args.targets}
    result = {
        "bookkeeping": {"trials": args.bookkeeping_trials, "ratios": cells,
                        "median": {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                                   for c, runs in cells.items()}},
        "steward_trials": costs,
        "sweeps": {"trials": args.trials, "budget_epochs": args.budget, "asha": ASHA, "space": SPACE, "seeds": seeds},
        "asha_speedup_to": {t: _median(v) for t, v in speedups.items()},
        "asha_speedup_whole_sweep": statistics.median(r["speedup_whole_sweep"] for r in seeds.values()),
        "load_average_at_start": load,
        "benchmark_s": time.monotonic() - started,
    }  # fmt: skip
    Console().print(summary(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.out}")


def summary(result: dict) -> Table:
    book, sweeps = result["bookkeeping"], result["sweeps"]
    table = Table(title=f"Sweep efficiency (2 trials at a time; load average {result['load_average_at_start']:.1f})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    large = book["trials"][1]
    for cell, median in book["median"].items():
        for key, label in (("whole", f"{large} trials, wall / ideal"), ("per_trial", "per trial beyond start-up")):
            runs = ", ".join(f"{r[key]:.3f}" for r in book["ratios"][cell])
            table.add_row(f"(a) {cell}: {label} (target <= 1.10)", f"{median[key]:.3f} ({runs})")
    for cost in result["steward_trials"]:
        where = "in Tune's trial process" if cost["workers"] == 1 else "a Ray Train run each"
        label = f"{cost['workers']} worker(s), {where}, {cost['trials']} trials, epoch {cost['epoch_s']:.2f} s"
        table.add_row(f"    steward trial, {label}: fixed cost per trial, s", f"{cost['fixed_cost_s']:.1f}")
    for seed, runs in sweeps["seeds"].items():
        to = {name: runs[name]["time_to_s"] for name in ("random", "asha")}
        reach = ", ".join(f"{t}: {_seconds(to['random'][t])} / {_seconds(to['asha'][t])}" for t in runs["speedup_to"])
        table.add_row(f"(b) seed {seed}, {sweeps['trials']} trials: random / ASHA, whole sweep; to val_accuracy",
                      f"{runs['random']['wall_s']:.0f} / {runs['asha']['wall_s']:.0f} s; {reach}")  # fmt: skip
    for target, speedup in result["asha_speedup_to"].items():
        table.add_row(f"    ASHA speed-up to val_accuracy {target}, median over seeds (target >= 2)",
                      "n/a" if speedup is None else f"{speedup:.2f}x")  # fmt: skip
    table.add_row("    ASHA speed-up, whole sweep, median over seeds", f"{result['asha_speedup_whole_sweep']:.2f}x")
    return table


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


if __name__ == "__main__":
    main()
