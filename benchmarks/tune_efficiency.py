"""Sweep efficiency, side by side in one run: Tune's bookkeeping overhead, and ASHA against random search.

    python benchmarks/tune_efficiency.py [--bookkeeping-trials 10 30] [--repeats 3] [--trials 12] [--budget 27]
        [--seeds 0 1 2]

(a) Bookkeeping, after Ray's own scalability test (release/tune_tests/scalability_tests, "bookkeeping overhead":
    trials of 1 s, actors reused): trials of 1 s at concurrency 2, each reporting 10 times (0.1 s apart: every
    report is a round trip through Tune's controller, and steward's Tune-side code runs once a report), at two
    sizes, through raw Ray Tune and with steward's Tune-side setup (its live trial table, its result loggers),
    interleaved, so steward's share shows as the difference. Reported: wall / ideal (N x 1 s / 2) at the larger
    size, and per trial beyond Tune's fixed start-up (the slope between the sizes), which is what Ray's 10,000-trial
    test converges to; the target (<= 1.10) is judged on the latter, with steward's setup.
    Steward's own trials are measured too: N trials of 1 digits-CNN epoch through steward's sweep, with one worker
    (trained in Tune's trial process) and with two (a Ray Train run per trial); a trial's fixed cost is the wall
    time per slot minus the epoch's own training time.
(b) ASHA vs random search on the digits CNN (jobs/tune-digits-asha.yaml), over a realistic search space: learning
    rate over four decades (1e-5 to 1e-1), width 16-128, dropout 0-0.5, so some configs are poor. 20% of the digits
    are held out for validation (what the searchers see) and another 20% for test (what no trial or scheduler
    sees). For each seed, both sweeps run the same seeded configs in the same order, 2 at a time, each allowed
    --budget epochs; ASHA (grace 1, reduction 3) stops the weakest at epochs 1, 3 and 9. Measured per seed:
    - the whole sweep's wall time;
    - quality: each sweep's best trial as steward picks it (`steward.tune.finish.best_row`: the completed trial with
      the best final validation accuracy) and its model's accuracy on the test split, by steward's own evaluation
      (`steward.evaluate.run.evaluate_model`);
    - wall time from the sweep's start until any trial first reports each --targets validation accuracy (from the
      trials' own histories: Tune's result timestamps are whole seconds).
    The verdict, at equal quality: a seed passes when random search's whole sweep takes >= 2x ASHA's and ASHA's
    best trial's test accuracy is within 0.5 points of random search's best; ASHA passes when most seeds do (both
    at once, in one sweep pair: medians taken apart could pair one seed's speed with another's accuracy). The
    medians over seeds are reported beside it.
Writes benchmarks/results/tune_efficiency.json and prints the table.
"""

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray import tune
from rich.console import Console
from rich.table import Table

from steward.bench.machine import manifest
from steward.evaluate.run import evaluate_model
from steward.ray_env import connect
from steward.runs import create_run, read_history
from steward.spec import JobSpec, load_job
from steward.tune.finish import best_row, best_trial_spec, trial_rows
from steward.tune.launch import TRIALS, sweep, tune_callbacks, tune_environment
from steward.tune.report import LiveTable

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "tune-digits-asha.yaml"
ASHA = "{name: asha, grace_period: 1, reduction_factor: 3}"
SPACE = (
    "tune.search_space={train.optimizer.lr: {loguniform: [1.0e-5, 1.0e-1]}, "
    "model.params.hidden_size: {choice: [16, 32, 64, 128]}, model.params.dropout: {uniform: [0.0, 0.5]}}"
)
# 359 validation and 359 test digits: accuracy in 0.28-point steps, finer than the 0.5-point quality tolerance
SPLITS = "data.splits={train: 0.6, validation: 0.2, test: 0.2}"
SPEEDUP_TARGET = 2.0  # random search's whole sweep over ASHA's
GAP_TARGET_POINTS = 0.5  # random search's best test accuracy less ASHA's, in points
BOOKKEEPING_TARGET = 1.10  # per trial beyond start-up, wall / ideal, with steward's setup

# (a)'s cells: reports per 1 s trial, and whether Tune runs with steward's Tune-side setup (its callbacks/loggers)
CELLS = {
    "10 reports/trial, raw Tune": (10, False),
    "10 reports/trial, steward's tune setup": (10, True),
}
JUDGED_CELL = "10 reports/trial, steward's tune setup"


def sleeper(config: dict) -> None:
    for step in range(config["reports"]):
        time.sleep(1 / config["reports"])
        tune.report({"step": step})


def bookkeeping(trials: int, tmp: Path, reports: int, steward: bool) -> float:
    """Wall time of `trials` 1 s trials at concurrency 2, seconds."""
    callbacks = tune_callbacks([LiveTable("step", ["i"])]) if steward else []
    tuner = tune.Tuner(
        sleeper,
        param_space={"i": tune.grid_search(list(range(trials))), "reports": reports},
        tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(
            storage_path=str(tmp), name=f"bookkeeping-{time.time_ns()}", verbose=0, callbacks=callbacks
        ),
    )
    started = time.monotonic()
    with tune_environment() if steward else contextlib.nullcontext():
        tuner.fit()
    return time.monotonic() - started


def bookkeeping_ratios(sizes: tuple[int, int], tmp: Path, reports: int, steward: bool) -> dict[str, float]:
    """Wall / ideal (trials x 1 s / 2) at the larger size, and per trial beyond Tune's start-up (the slope between
    the two sizes: what Ray's 10,000-trial test converges to)."""
    small, large = (bookkeeping(n, tmp, reports, steward) for n in sizes)
    return {"whole": large / (sizes[1] / 2), "per_trial": (large - small) / ((sizes[1] - sizes[0]) / 2)}


@dataclass
class Sweep:
    """One finished steward sweep: its spec, run folder, Tune's result grid, start and wall time."""

    spec: JobSpec
    run_dir: Path
    grid: tune.ResultGrid
    started: float
    wall_s: float

    def epochs(self) -> list[dict]:
        """Every trial's epoch records, from the trials' own histories."""
        histories = sorted((self.run_dir / TRIALS).glob("*/history.jsonl"))
        return [r for h in histories for r in read_history(h) if r["kind"] == "epoch"]


def steward_sweep(tmp: Path, name: str, overrides: list[str]) -> Sweep:
    """Run a steward sweep as `steward tune` does, without making the run's model afterwards."""
    spec = load_job(JOB, [f"output_dir={tmp / name}", *overrides])
    run_dir = create_run(spec)
    started = time.time()
    grid = sweep(spec, run_dir, None, [])
    return Sweep(spec, run_dir, grid, started, time.time() - started)


def steward_trial_cost(tmp: Path, trials: int, workers: int) -> dict:
    """Steward's fixed cost per trial: wall time per slot of 1-epoch trials, less the epoch's own training time."""
    slots = 2 // workers  # trials at a time on 2 cores
    common = [
        "train.epochs=1",
        f"tune.num_samples={trials}",
        f"tune.max_concurrent_trials={slots}",
        f"distributed.num_workers={workers}",
    ]
    run = steward_sweep(tmp, f"start-{workers}", [*common, "tune.scheduler={name: fifo}"])
    epoch_s = statistics.mean(r["epoch_seconds"] for r in run.epochs())
    per_slot = run.wall_s / (trials / slots)
    return {
        "trials": trials,
        "workers": workers,
        "wall_s": run.wall_s,
        "per_slot_s": per_slot,
        "epoch_s": epoch_s,
        "fixed_cost_s": per_slot - epoch_s,
    }


def best_trial(run: Sweep) -> dict:
    """The sweep's best trial as steward picks it, and its model's metrics on the test split."""
    assert run.spec.tune is not None
    best = best_row(trial_rows(run.grid, run.spec.tune.metric, run.run_dir), run.spec.tune.mode)
    model_dir = run.run_dir / TRIALS / best.trial_id / "model"
    test = evaluate_model(model_dir, best_trial_spec(run.spec, best), "test")
    return {
        "trial_id": best.trial_id,
        "epochs": best.iterations,
        "val_accuracy": best.metric,
        "test_accuracy": test["overall"]["accuracy"],
        "test_samples": test["num_samples"],
        "config": best.config,
    }


def time_to(reports: list[dict], target: float) -> float | None:
    hits = [r["t"] for r in reports if r["val_accuracy"] >= target]
    return min(hits) if hits else None


def equal_quality(speedup: float, gap_points: float) -> dict:
    """ASHA's verdict: >= SPEEDUP_TARGET x less wall time at a best test accuracy within GAP_TARGET_POINTS."""
    return {
        "speedup": speedup,
        "test_gap_points": gap_points,
        "pass": speedup >= SPEEDUP_TARGET and gap_points <= GAP_TARGET_POINTS,
    }


def asha_vs_random(tmp: Path, trials: int, budget: int, targets: list[float], seed: int) -> dict:
    """Both sweeps over the same seeded configs: wall time in all and to each target, and each best trial's test
    accuracy."""
    common = [
        f"train.epochs={budget}",
        f"tune.num_samples={trials}",
        "tune.max_concurrent_trials=2",
        SPACE,
        SPLITS,
        f"tune.seed={seed}",
    ]
    runs: dict = {}
    for name, scheduler in (("random", "{name: fifo}"), ("asha", ASHA)):
        run = steward_sweep(tmp, f"{name}-{seed}", [*common, f"tune.scheduler={scheduler}"])
        reports = [{"t": r["time"] - run.started, "val_accuracy": r["val_accuracy"]} for r in run.epochs()]
        runs[name] = {
            "wall_s": run.wall_s,
            "epochs_trained": len(reports),
            "max_val_accuracy_any_epoch": max(r["val_accuracy"] for r in reports),
            "best_trial": best_trial(run),
            "time_to_s": {str(t): time_to(reports, t) for t in targets},
        }
    best = {name: runs[name]["best_trial"]["test_accuracy"] for name in ("random", "asha")}
    runs["speedup_whole_sweep"] = runs["random"]["wall_s"] / runs["asha"]["wall_s"]
    runs["equal_quality"] = equal_quality(runs["speedup_whole_sweep"], 100 * (best["random"] - best["asha"]))
    runs["speedup_to"] = {
        str(t): _ratio(runs["random"]["time_to_s"][str(t)], runs["asha"]["time_to_s"][str(t)]) for t in targets
    }
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
    job = load_job(JOB)
    connect(None, job)
    started, load = time.monotonic(), os.getloadavg()[0]
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="steward-tune-bench-") as folder:
        tmp = Path(folder)
        cells: dict[str, list[dict]] = {cell: [] for cell in CELLS}
        for _ in range(args.repeats):  # interleaved: drift of a shared machine hits every cell alike
            for cell, ratios in cells.items():
                ratios.append(bookkeeping_ratios(args.bookkeeping_trials, tmp, *CELLS[cell]))
        Console().print(f"bookkeeping wall / ideal: {cells}")
        seconds["bookkeeping"] = time.monotonic() - started
        costs = [steward_trial_cost(tmp, args.steward_trials // workers, workers) for workers in (1, 2)]
        Console().print(f"steward trials: {costs}")
        seconds["steward_trials"] = time.monotonic() - started - sum(seconds.values())
        seeds = {str(seed): asha_vs_random(tmp, args.trials, args.budget, args.targets, seed) for seed in args.seeds}
        seconds["asha_vs_random"] = time.monotonic() - started - sum(seconds.values())
    result = {
        "manifest": manifest(job),  # the CPU among them: figures differ a lot between the machines' CPU kinds
        "bookkeeping": bookkeeping_result(args.bookkeeping_trials, cells),
        "steward_trials": costs,
        "sweeps": {
            "trials": args.trials,
            "budget_epochs": args.budget,
            "asha": ASHA,
            "space": SPACE,
            "splits": SPLITS,
            "seeds": seeds,
        },
        "asha_equal_quality": sweep_verdict(seeds),
        "asha_speedup_to": {str(t): _median([r["speedup_to"][str(t)] for r in seeds.values()]) for t in args.targets},
        "load_average_at_start": load,
        "seconds": seconds,
        "benchmark_s": time.monotonic() - started,
    }
    Console().print(summary(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    Console().print(f"wrote {args.out}")


def bookkeeping_result(sizes: list[int], cells: dict[str, list[dict]]) -> dict:
    """(a)'s ratios per repeat, their medians per cell, and the verdict on the judged cell."""
    median = {c: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for c, runs in cells.items()}
    judged = median[JUDGED_CELL]["per_trial"]
    verdict = {"cell": JUDGED_CELL, "per_trial": judged, "target": BOOKKEEPING_TARGET}
    return {
        "trials": sizes,
        "ratios": cells,
        "median": median,
        "verdict": verdict | {"pass": judged <= BOOKKEEPING_TARGET},
    }


def sweep_verdict(seeds: dict[str, dict]) -> dict:
    """ASHA's equal-quality verdict: most seeds pass; with the medians over seeds and each seed's figures."""
    each = [runs["equal_quality"] for runs in seeds.values()]
    speedups, gaps = [e["speedup"] for e in each], [e["test_gap_points"] for e in each]
    passed = sum(e["pass"] for e in each)
    return {
        "pass": passed > len(each) / 2,
        "seeds_passed": passed,
        "seeds": len(each),
        "median": equal_quality(statistics.median(speedups), statistics.median(gaps)),
        "speedups": speedups,
        "test_gaps_points": gaps,
        "speedup_target": SPEEDUP_TARGET,
        "gap_target_points": GAP_TARGET_POINTS,
    }


def summary(result: dict) -> Table:
    book, sweeps = result["bookkeeping"], result["sweeps"]
    cpu, load = result["manifest"]["cpu"], result["load_average_at_start"]
    table = Table(title=f"Sweep efficiency, {cpu} (2 trials at a time; load average {load:.1f})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    large = book["trials"][1]
    for cell, median in book["median"].items():
        for key, label in (("whole", f"{large} trials, wall / ideal"), ("per_trial", "per trial beyond start-up")):
            runs = ", ".join(f"{r[key]:.3f}" for r in book["ratios"][cell])
            target = f" (target <= {BOOKKEEPING_TARGET:.2f})" if key == "per_trial" and cell == JUDGED_CELL else ""
            table.add_row(f"(a) {cell}: {label}{target}", f"{median[key]:.3f} ({runs})")
    table.add_row("    verdict", "pass" if book["verdict"]["pass"] else "FAIL")
    for cost in result["steward_trials"]:
        where = "in Tune's trial process" if cost["workers"] == 1 else "a Ray Train run each"
        label = f"{cost['workers']} worker(s), {where}, {cost['trials']} trials, epoch {cost['epoch_s']:.2f} s"
        table.add_row(f"    steward trial, {label}: fixed cost per trial, s", f"{cost['fixed_cost_s']:.1f}")
    for seed, runs in sweeps["seeds"].items():
        _seed_rows(table, seed, runs, sweeps["trials"])
    _verdict_rows(table, result["asha_equal_quality"])
    for target, speedup in result["asha_speedup_to"].items():
        each = ", ".join(_times(r["speedup_to"][target]) for r in sweeps["seeds"].values())
        value = "n/a" if speedup is None else f"{speedup:.2f}x ({each})"
        table.add_row(f"    ASHA speed-up to val_accuracy {target}, median over seeds", value)
    return table


def _seed_rows(table: Table, seed: str, runs: dict, trials: int) -> None:
    to = {name: runs[name]["time_to_s"] for name in ("random", "asha")}
    reach = ", ".join(f"{t}: {_seconds(to['random'][t])} / {_seconds(to['asha'][t])}" for t in runs["speedup_to"])
    walls = f"{runs['random']['wall_s']:.0f} / {runs['asha']['wall_s']:.0f} s"
    table.add_row(f"(b) seed {seed}, {trials} trials: random / ASHA, whole sweep; to val_accuracy", f"{walls}; {reach}")
    best = {name: runs[name]["best_trial"] for name in ("random", "asha")}
    accuracy = " / ".join(f"{b['val_accuracy']:.4f}, {b['test_accuracy']:.4f}" for b in best.values())
    table.add_row("    best trial (final val_accuracy), random / ASHA: val, test accuracy", accuracy)
    verdict = runs["equal_quality"]
    outcome = "pass" if verdict["pass"] else "FAIL"
    gap = f"{verdict['speedup']:.2f}x at {verdict['test_gap_points']:+.2f} points: {outcome}"
    table.add_row("    ASHA speed-up, whole sweep; test accuracy gap (random - ASHA)", gap)


def _verdict_rows(table: Table, verdict: dict) -> None:
    median = verdict["median"]
    speedups = ", ".join(f"{s:.2f}" for s in verdict["speedups"])
    speedup_label = f"ASHA speed-up, whole sweep, median over seeds (target >= {verdict['speedup_target']:g}x)"
    table.add_row(f"    {speedup_label}", f"{median['speedup']:.2f}x ({speedups})")
    gaps = ", ".join(f"{g:+.2f}" for g in verdict["test_gaps_points"])
    gap_label = f"best test accuracy, random - ASHA, points, median (target <= {verdict['gap_target_points']:g})"
    table.add_row(f"    {gap_label}", f"{median['test_gap_points']:+.2f} ({gaps})")
    outcome = "pass" if verdict["pass"] else "FAIL"
    on_medians = "pass" if median["pass"] else "FAIL"
    seeds = f"{verdict['seeds_passed']} of {verdict['seeds']} seeds pass both at once"
    table.add_row(
        "    ASHA at equal quality: verdict (most seeds must pass)", f"{outcome}: {seeds}; medians: {on_medians}"
    )


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:.0f} s"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _ratio(slow: float | None, fast: float | None) -> float | None:
    return slow / fast if slow and fast else None


if __name__ == "__main__":
    main()
