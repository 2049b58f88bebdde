"""`steward models list|show|promote|archive`: the model registry (MLflow's), argument parsing and printing."""

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from steward.cli.common import PolicyOption, console, user_errors

models_app = typer.Typer(
    no_args_is_help=True,
    help="The model registry: registered versions, their gates and aliases; promote (policy-checked, audited).",
)
OutputDir = Annotated[
    Path, typer.Option(help="output_dir of the runs: its mlflow.db is the registry, its audit log records changes.")
]
TrackingUri = Annotated[
    str | None,
    typer.Option(help="The registry's MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db)."),
]
Name = Annotated[str, typer.Argument(help="Registered model name (the spec's name).")]
Ref = Annotated[str, typer.Argument(help="A version number, or an alias (champion, challenger).")]


def _client(output_dir: Path, tracking_uri: str | None):  # type: ignore[no-untyped-def]
    from steward.serve import registry

    return registry.open_registry(tracking_uri or registry.default_uri(output_dir))


@models_app.command("list")
@user_errors
def list_(
    name: Annotated[str | None, typer.Argument(help="Only this model.")] = None,
    output_dir: OutputDir = Path("runs"),
    tracking_uri: TrackingUri = None,
) -> None:
    """Every registered version, newest first: aliases, gates, the run it came from."""
    from steward.serve import registry

    table = Table("model", "version", "aliases", "gates", "run")
    for version in registry.versions(_client(output_dir, tracking_uri), name):
        table.add_row(
            version.name,
            version.version,
            ", ".join(version.aliases) or ("archived" if version.archived else ""),
            _gates(version),
            version.tags.get("steward.run_id", ""),
        )
    console.print(table)


@models_app.command("show")
@user_errors
def show(
    name: Name, ref: Ref = "champion", output_dir: OutputDir = Path("runs"), tracking_uri: TrackingUri = None
) -> None:
    """One version: aliases, gates, tags, and the model card it was registered with."""
    from steward.serve import registry

    client = _client(output_dir, tracking_uri)
    version = registry.get(client, name, ref)
    console.print(f"[bold]models:/{version.name}/{version.version}[/] {', '.join(version.aliases)}")
    console.print(f"gates: {_gates(version)}", markup=False)
    for key, value in sorted(version.tags.items()):
        console.print(f"  {key}: {value}", markup=False)
    description = client.get_model_version(name, version.version).description
    if description:
        console.print(description, markup=False)


@models_app.command("register")
@user_errors
def register(run: Annotated[Path, typer.Argument(help="A succeeded run folder (runs/<name>/<run-id>).")]) -> None:
    """Register a succeeded run's model in its output_dir's registry (or tracking.uri's): a run trained with
    tracking off, or cut short before it registered."""
    from steward.serve.registry import register_run

    console.print(f"registered {register_run(run)}", markup=False)


@models_app.command("promote")
@user_errors
def promote(
    name: Name,
    ref: Ref,
    alias: Annotated[str, typer.Option(help="Alias to point at it.")] = "champion",
    output_dir: OutputDir = Path("runs"),
    tracking_uri: TrackingUri = None,
    policy: PolicyOption = None,
) -> None:
    """Point an alias (champion) at a version: refused, exit 2, when it failed a gate, is archived, or the policy in
    force refuses its spec. Recorded in the audit log either way."""
    from steward.govern.audit import log_path
    from steward.serve import registry

    registry.check_alias(alias)
    version = registry.promote(_client(output_dir, tracking_uri), name, ref, alias, policy, log_path(output_dir))
    console.print(f"[green]promoted[/] models:/{escape(version.name)}/{version.version} to {escape(alias)}")


@models_app.command("archive")
@user_errors
def archive(name: Name, ref: Ref, output_dir: OutputDir = Path("runs"), tracking_uri: TrackingUri = None) -> None:
    """Take a version's aliases off and mark it archived (it stays as a record; it can no longer be promoted)."""
    from steward.govern.audit import log_path
    from steward.serve import registry

    version = registry.archive(_client(output_dir, tracking_uri), name, ref, log_path(output_dir))
    console.print(f"archived models:/{escape(version.name)}/{version.version}")


def _gates(version) -> str:  # type: ignore[no-untyped-def]
    return ", ".join(f"{gate} {result}" for gate, result in version.gates.items())
