"""Tracking's cost, side by side in one run: `steward train` on the quickstart with tracking on vs off.

    python benchmarks/tracking_overhead.py [--repeats 3]

Each repeat runs the whole command twice, tracking off and on, in alternating order (off, on; then on, off; ...),
into one output_dir, so the embedded SQLite store is made by the first tracked run and reused after it, as a
user's store is. Reported per repeat and as median and spread: the wall time of each, and tracking's cost as the
difference over the untracked run's wall time (a tracked run also registers its model). Beside it, with no noise
from training: the time the driver spends in tracking (`Tracker.start`, `register` and `finish` on a finished run
folder, into a fresh store and into an existing one), as a share of the median untracked run.
Target (issue 26): <= 1% of training wall time.
Writes benchmarks/results/tracking_overhead.json and prints the table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from steward.bench.machine import manifest
from steward.serve.model import REGISTERED
from steward.serve.registry import register
from steward.spec import load_job
from steward.tracking import TRACKED, Tracker

ROOT = Path(__file__).resolve().parent.parent
JOB = ROOT / "jobs" / "quickstart.yaml"


def train(output_dir: Path, tracked: bool) -> float:
    """Wall seconds of one `steward train` of the quickstart."""
    argv = [sys.executable, "-m", "steward", "train", str(JOB), "--set", f"output_dir={output_dir}",
            "--set", f"tracking.enabled={str(tracked).lower()}"]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"steward train failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return seconds


def tracker_seconds(output_dir: Path) -> dict[str, float]:
    """The driver's time in tracking and registering one finished run folder: into a fresh store, then into the
    same store."""
    run_dir = sorted(output_dir.glob("quickstart/*/metrics.json"))[-1].parent
    seconds = {}
    for store in ("fresh", "existing"):
        (run_dir / TRACKED).unlink(missing_ok=True)
        (run_dir / REGISTERED).unlink(missing_ok=True)
        job = load_job(JOB, [f"output_dir={output_dir}", f"tracking.uri=sqlite:///{output_dir / 'timing.db'}"])
        started = time.perf_counter()
        tracker = Tracker.start(job, run_dir, "train", print)
        register(tracker, job, run_dir)
        tracker.finish(run_dir, "succeeded")
        seconds[store] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory(prefix="steward-tracking-bench-") as folder:
        output_dir = Path(folder) / "runs"
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            walls = {tracked: train(output_dir, tracked) for tracked in order}
            rows.append({"off_s": walls[False], "on_s": walls[True], "cost": walls[True] / walls[False] - 1})
            console.print(f"repeat {repeat + 1}: off {walls[False]:.1f} s, on {walls[True]:.1f} s")
        inside = tracker_seconds(output_dir)
    costs = [r["cost"] for r in rows]
    off = statistics.median(r["off_s"] for r in rows)
    result = {
        "manifest": manifest(load_job(JOB)),
        "repeats": rows,
        "cost_median": statistics.median(costs),
        "cost_range": [min(costs), max(costs)],
        "tracker_seconds": inside,
        "tracker_share": {store: seconds / off for store, seconds in inside.items()},
        "target": 0.01,
    }
    table = Table(title="steward train jobs/quickstart.yaml: tracking on vs off")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row("wall, tracking off (median)", f"{off:.1f} s")
    table.add_row(
        "cost on - off (median, range)", f"{result['cost_median']:+.1%} [{min(costs):+.1%}, {max(costs):+.1%}]"
    )
    for store, share in result["tracker_share"].items():
        table.add_row(f"driver time in tracking, {store} store", f"{inside[store]:.2f} s = {share:.1%} of the run")
    console.print(table)
    out = ROOT / "benchmarks" / "results" / "tracking_overhead.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
