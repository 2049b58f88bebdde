"""`steward bench`: run every cell of the matrix, interleaved and repeated, and write what was measured."""

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from steward.bench.cells import Cell, baseline_cell, cell_spec, matrix_cells, schedule
from steward.bench.machine import manifest, matmul_ceiling
from steward.bench.report import live_table, summarise, write_report
from steward.bench.serve import run_serve_cell, training_key
from steward.bench.train import run_train_cell
from steward.ray_env import connect, free_port
from steward.runs import create_run, set_status
from steward.spec import JobSpec
from steward.stages import train_model


def bench_job(spec: JobSpec, run_dir: Path, address: str | None, console: Console) -> dict:
    """Measure every cell `bench.repeats` times in interleaved order; bench.json, bench.md and plots in run_dir.

    bench.json is rewritten after every run, so an interrupted benchmark keeps what it measured.
    """
    assert spec.bench is not None
    cells = matrix_cells(spec)
    result: dict[str, Any] = {
        "name": spec.name,
        "measure": spec.bench.measure,
        "repeats": spec.bench.repeats,
        "load": spec.bench.load.model_dump(),
        "baseline": baseline_cell(spec, cells).label,
        "manifest": manifest(spec),
        "ceiling": matmul_ceiling(spec.bench.matmul_size),  # before Ray starts: the machine at rest
        "order": [],
        "cells": [{"index": c.index, "label": c.label, "values": c.values, "runs": []} for c in cells],
        "complete": False,
    }
    connect(address, spec)
    runner = CellRunner(spec, run_dir)
    plan = schedule(cells, spec.bench.repeats)
    with Live(live_table(result, len(plan)), console=console, refresh_per_second=2) as live:
        for repeat, cell in plan:
            result["order"].append({"cell": cell.label, "repeat": repeat})
            result["cells"][cell.index]["runs"].append(runner.run(cell))
            summarise(result)
            _write_json(run_dir / "bench.json", result)
            live.update(live_table(result, len(plan)))
    # The ceiling is the machine's best, so it is timed again at the end and the faster count kept: right after
    # other work (a Ray cluster still shutting down) the cores are not yet the machine's own.
    result["ceiling"] = max(result["ceiling"], matmul_ceiling(spec.bench.matmul_size), key=lambda c: c["flops_per_s"])
    summarise(result)
    result["complete"] = True
    write_report(result, run_dir)
    return result


class CellRunner:
    """Runs one cell once: a training measurement, a serving measurement, or both."""

    def __init__(self, spec: JobSpec, run_dir: Path):
        assert spec.bench is not None
        self.spec, self.cells_dir = spec, str(run_dir / "cells")
        self.training, self.serving = spec.bench.training, spec.bench.serving
        self.port = free_port() if self.serving else 0
        self.trained: dict[str, Path] = {}  # serving cells that differ only in serving share one trained model
        self.costs: dict[str, dict] = {}  # a cell's FLOPs per sample, counted on its first run

    def run(self, cell: Cell) -> dict:
        measured: dict = {"started": time.time()}
        if self.training:
            variant = cell_spec(self.spec, cell, self.cells_dir, training=True)
            measured |= run_train_cell(variant, self.costs)
        if self.serving:
            variant = cell_spec(self.spec, cell, self.cells_dir, training=False)
            measured |= run_serve_cell(variant, self._trained_run(variant), self.port)
        return measured

    def _trained_run(self, variant: JobSpec) -> Path:
        key = training_key(variant)
        if key not in self.trained:
            run_dir = create_run(variant)
            result = train_model(variant, run_dir)
            set_status(run_dir, "succeeded", headline=result["overall"])
            self.trained[key] = run_dir
        return self.trained[key]


def _write_json(path: Path, result: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(path)
