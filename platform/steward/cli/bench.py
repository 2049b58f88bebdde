"""`steward bench SPEC` and `steward bench compare A.json B.json`: argument parsing and printing."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steward.cli.common import Address, PolicyOption, Sets, Spec, console, default_command, errors, user_errors
from steward.errors import StewardError
from steward.govern.policy import Admission
from steward.spec import load_job

bench_app = typer.Typer(cls=default_command("run"), no_args_is_help=True, help="Benchmark a matrix of spec variants.")
Result = Annotated[Path, typer.Argument(help="A bench.json that `steward bench` wrote.")]


@bench_app.command("run")
@user_errors
def run(
    spec: Spec,
    set_: Sets = None,
    address: Address = None,
    policy: PolicyOption = None,
) -> None:
    """Run the spec's bench matrix, interleaved and repeated; writes bench.json, bench.md and plots."""
    from steward import pipeline

    run_dir = pipeline.bench(load_job(spec, set_ or []), address, console, Admission("bench", str(spec), policy))
    console.print(f"results: {run_dir / 'bench.json'}, {run_dir / 'bench.md'}, plots in {run_dir}", markup=False)


@bench_app.command("compare")
@user_errors
def compare(a: Result, b: Result) -> None:
    """B's numbers over A's, cell by cell; warns where the two were measured on different machines or versions."""
    from steward.bench.report import compare as ratios

    rows, warnings = ratios(_read(a), _read(b))
    for warning in warnings:
        errors.print(f"warning: machines differ: {warning}", style="yellow", markup=False)
    if not rows:
        raise StewardError(f"{a} and {b} share no cell with measurements; compare results of the same matrix")
    table = Table(title=f"B / A   (A: {a}, B: {b})")
    for header in ("cell", "metric", "A", "B", "B/A"):
        table.add_column(header, justify="left" if header in ("cell", "metric") else "right")
    for row in rows:
        table.add_row(row["cell"], row["metric"], f"{row['a']:.4g}", f"{row['b']:.4g}", f"{row['ratio']:.3f}")
    console.print(table)


def _read(path: Path) -> dict:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:  # a binary file is not a bench.json either
        raise StewardError(f"{path}: not a readable bench.json ({err})") from None
    if not isinstance(result, dict) or not {"manifest", "ceiling", "baseline", "cells"} <= set(result):
        raise StewardError(f"{path}: not a bench result (no manifest, ceiling, baseline and cells); pass a bench.json")
    return result
