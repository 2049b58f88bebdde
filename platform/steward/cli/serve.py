"""`steward serve [deploy] SPEC`, `serve status`, `serve stop NAME`: argument parsing and printing."""

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steward.cli.common import Address, PolicyOption, Sets, Spec, console, default_command, fail, user_errors
from steward.govern.policy import admit
from steward.ray_env import is_local
from steward.spec import JobSpec, load_job
from steward.storage import is_uri

Override = Annotated[
    str | None,
    typer.Option(help="Deploy a run that failed its fairness gate; the REASON is recorded in the audit log."),
]

serve_app = typer.Typer(
    cls=default_command("deploy"),
    no_args_is_help=True,
    help="Serve a trained model on Ray Serve: `steward serve SPEC` deploys; `status` and `stop NAME` manage.",
)
ClusterAddress = Annotated[str, typer.Option(help="Ray address of the cluster serving (auto, ray://..., host:port).")]


@serve_app.command("deploy")
@user_errors
def serve_deploy(
    spec: Spec,
    set_: Sets = None,
    run: Annotated[
        str | None, typer.Option(help="Run folder or its URI to serve (default: the newest succeeded run).")
    ] = None,
    address: Address = None,
    host: Annotated[str, typer.Option(help="HTTP host Serve listens on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port Serve listens on.")] = 8000,
    model: Annotated[
        str | None,
        typer.Option(
            help="A registered version to serve instead: models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION, "
            "from the spec's MLflow registry (tracking.uri, $MLFLOW_TRACKING_URI, or output_dir's mlflow.db)."
        ),
    ] = None,
    export: Annotated[
        Path | None, typer.Option(help="Write a Ray Serve config file here instead of deploying.")
    ] = None,
    policy: PolicyOption = None,
    override_fairness_gate: Override = None,
) -> None:
    """Deploy the spec's model (embedded Ray: serves until Ctrl-C; --address: returns once deployed)."""
    from steward.serve.deploy import export_config
    from steward.serve.source import find_run
    from steward.storage import fetch_run

    job = load_job(spec, set_ or [])
    admit(job, policy, "serve", str(spec))
    if model is not None and run is not None:
        fail("--model and --run each name what to serve: pass one of them", 2)
    if model is not None:
        from steward.serve.registry import served_version

        run = str(served_version(job, model))
    run_dir = find_run(job, (fetch_run(run, "--run") if is_uri(run) else Path(run)) if run else None)
    if export is not None:
        export_config(job, run_dir, export, port=port, override_fairness_gate=override_fairness_gate)
        console.print(f"wrote [bold]{export}[/] (serve deploy {export}; or a RayService's serveConfigV2)")
        return
    deploy_and_wait(job, run_dir, address, host, port, override_fairness_gate)


@serve_app.command("status")
@user_errors
def serve_status(address: ClusterAddress = "auto") -> None:
    """List the Serve applications on the cluster with their state and replicas."""
    from steward.serve.deploy import status_rows

    table = Table("name", "status", "replicas", "message")
    for row in status_rows(address):
        replicas = ", ".join(f"{state.lower()}={n}" for state, n in row["replicas"].items())
        table.add_row(row["name"], row["status"], replicas, row["message"])
    console.print(table)


@serve_app.command("stop")
@user_errors
def serve_stop(
    name: Annotated[str, typer.Argument(help="Serve application name.")], address: ClusterAddress = "auto"
) -> None:
    """Delete one Serve application and its replicas."""
    from steward.serve.deploy import stop

    stop(name, address)
    console.print(f"stopped [bold]{name}[/]")


def deploy_and_wait(
    job: JobSpec, run_dir: Path, address: str | None, host: str, port: int, override: str | None = None
) -> None:
    """Deploy and print the endpoints; with an embedded Ray, keep serving until Ctrl-C."""
    import threading

    from steward.serve.deploy import deploy, stop

    try:
        deployed = deploy(job, run_dir, address, host, port, override_fairness_gate=override)
    except RuntimeError as err:  # Serve's own failure to bring replicas up (its message says why)
        fail(f"deploy failed: {err}", 1)
    if deployed.gate:
        console.print(f"int8 gate passed: {deployed.gate}", markup=False)
    console.print(f"serving [bold]{deployed.name}[/] from {run_dir}")
    monitored = ("GET /monitor", "POST /feedback") if job.monitor else ()
    infer = f"POST /v2/models/{deployed.name}/infer"
    routes = ("POST /predict", "POST /explain", infer, *monitored)
    if job.model.task == "causal_lm":  # the OpenAI-compatible generation API (steward.serve.generate_app)
        routes = ("POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models")
    for route in (*routes, "GET /healthz", "GET /info"):
        method, path = route.split()
        console.print(f"  {method:4} {deployed.url}{path}", markup=False)
    if is_local(address):  # the embedded Ray lives as long as this process
        console.print("embedded Ray: serving until Ctrl-C")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()
        # the embedded Ray ends with this process: its replicas send what they hold and the monitor saves first
        console.print(f"stopping {deployed.name}: saving the monitor's state")
        stop(deployed.name, address, job.output_dir)
