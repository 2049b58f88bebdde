"""`steward`: the command line. Argument parsing and printing only: every run goes through steward.pipeline.

Light commands (validate, render, schema, policy, k8s, card, audit, runs, jobs, bench compare) import none of
torch, Ray or DeepSpeed: each subcommand imports what it needs when it runs.
"""

import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.table import Table

from steward.cli.bench import bench_app
from steward.cli.cluster import jobs_app, k8s, submit
from steward.cli.common import PolicyOption, Sets, Spec, console, errors, user_errors
from steward.cli.govern import audit_app, card, policy_app
from steward.cli.models import models_app
from steward.cli.rollout import rollout_app
from steward.cli.run import estimate, evaluate, explain, monitor_app, privacy_app, run, train, tune
from steward.cli.serve import serve_app
from steward.govern.policy import PolicyViolation, admit
from steward.spec import JobSpec, SpecError, load_job

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train, tune, serve and watch models on Ray.")
for command in (train, tune, run, estimate, evaluate, explain, submit, k8s):
    app.command()(command)
app.command("card")(card)
GROUPS = {
    "serve": serve_app,
    "bench": bench_app,
    "jobs": jobs_app,
    "audit": audit_app,
    "policy": policy_app,
    "privacy": privacy_app,
    "monitor": monitor_app,
    "models": models_app,
    "rollout": rollout_app,
}
for name, group in GROUPS.items():
    app.add_typer(group, name=name)


@app.command()
@user_errors
def validate(
    specs: Annotated[list[Path], typer.Argument(help="Job spec files.")], set_: Sets = None, policy: PolicyOption = None
) -> None:
    """Validate job specs (and the policy in force): one line per valid spec, every problem; exit 2 if any fails."""
    failed = False
    for path in specs:
        try:
            spec = load_job(path, set_ or [])
            admit(spec, policy, "validate", str(path))
        except (SpecError, PolicyViolation) as err:
            failed = True
            errors.print(str(err), markup=False)
            continue
        dist = spec.distributed
        what = f"{spec.model.family} on {spec.data.source}, {dist.num_workers} worker(s)"
        console.print(f"[green]ok[/] {path}: {spec.name} - {what}, {dist.strategy} ZeRO-{dist.zero_stage}")
    if failed:
        raise typer.Exit(2)


@app.command()
@user_errors
def render(spec: Spec, set_: Sets = None) -> None:
    """Print the fully resolved spec with every default filled in."""
    console.print(yaml.safe_dump(load_job(spec, set_ or []).model_dump(mode="json"), sort_keys=False), markup=False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of job specs (point your editor at it for autocompletion)."""
    print(json.dumps(JobSpec.model_json_schema(), indent=2))


@app.command()
@user_errors
def runs(
    output_dir: Annotated[Path, typer.Option(help="Folder holding run folders.")] = Path("runs"),
    storage: Annotated[str | None, typer.Option(help="Cluster storage instead: a shared folder or a URI.")] = None,
) -> None:
    """List runs with their status and headline metric, newest first."""
    from steward.runs import list_runs

    table = Table("name", "run", "state", "headline")
    for r in list_runs(storage or output_dir):
        color = {"succeeded": "green", "failed": "red"}.get(r.state, "yellow")
        table.add_row(r.name, r.path.name, f"[{color}]{r.state}[/]", r.headline)
    console.print(table)


def main() -> None:
    app()
