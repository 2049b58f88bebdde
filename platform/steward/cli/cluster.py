"""`steward submit`, `steward jobs list|status|logs|stop` and `steward k8s`: argument parsing and printing."""

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from steward.cli.common import PolicyOption, Sets, Spec, console, user_errors
from steward.errors import StewardError
from steward.govern.policy import Admission, admit
from steward.spec import load_job

JobsAddress = Annotated[
    str | None, typer.Option(help="Jobs API of the cluster: http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS).")
]


@user_errors
def submit(
    spec: Spec,
    set_: Sets = None,
    stage: Annotated[str, typer.Option(help="train, tune, serve or run (every stage the spec declares).")] = "run",
    address: JobsAddress = None,
    storage: Annotated[
        str | None, typer.Option(help="Shared folder or s3:// / gs:// URI for run folders (sets output_dir).")
    ] = None,
    deps: Annotated[
        str,
        typer.Option(help="pip: install steward's pinned requirements in the job; preinstalled: the cluster has them."),
    ] = "pip",
    port: Annotated[int, typer.Option(help="HTTP port Serve listens on (serve and run stages).")] = 8000,
    wait: Annotated[bool, typer.Option(help="Follow the job's log until it ends (exit 1 if it fails).")] = True,
    policy: PolicyOption = None,
) -> None:
    """Validate the spec (and the policy in force) here, then run it on a Ray cluster through the Ray Jobs API."""
    from steward.cluster.jobs import follow, raise_if_failed
    from steward.cluster.jobs import submit as submit_job

    if stage not in ("train", "tune", "serve", "run") or deps not in ("pip", "preinstalled"):
        raise StewardError(f"--stage {stage} --deps {deps}: stage is train|tune|serve|run, deps is pip|preinstalled")
    job = load_job(spec, [*(set_ or []), *([f"output_dir={storage}"] if storage else [])])
    done = submit_job(job, stage, address, deps, port, Admission("submit", str(spec), policy))  # type: ignore[arg-type]
    console.print(f"submitted [bold]{done.job_id}[/] ({done.package_bytes / 1024:.0f} KiB package)")
    console.print(f"dashboard {done.dashboard_url}", markup=False)
    if wait:
        raise_if_failed(done.address, follow(done.address, done.job_id, _write))
        console.print(f"[green]{done.job_id} succeeded[/]; run folders under {job.output_dir}")


def _write(text: str) -> None:
    """A job's log as it is, tabs and all (rich would expand them), on stdout at once (a pipe buffers otherwise)."""
    sys.stdout.write(text)
    sys.stdout.flush()


jobs_app = typer.Typer(
    no_args_is_help=True, help="Jobs on a Ray cluster (any cluster's Jobs API): list, status, logs, stop."
)
JobId = Annotated[str, typer.Argument(help="Submission id (as `steward submit` printed) or Ray job id.")]


@jobs_app.command("list")
@user_errors
def jobs_list(address: JobsAddress = None) -> None:
    """Every job on the cluster, newest first."""
    from steward.cluster.jobs import list_jobs

    jobs = list_jobs(address)
    ids = [job.submission_id or job.job_id or "" for job in jobs]
    table = Table("status", "stage", "entrypoint")
    table.add_column("id", no_wrap=True, min_width=max(map(len, ids), default=2))  # an id must stay copyable
    for job, job_id in zip(jobs, ids, strict=True):
        meta = job.metadata or {}
        stage = f"{meta.get('steward_job', '')} {meta.get('steward_stage', '')}".strip()
        table.add_row(str(job.status), stage, job.entrypoint[:60], job_id)
    console.print(table)


@jobs_app.command("status")
@user_errors
def jobs_status(job_id: JobId, address: JobsAddress = None) -> None:
    """One job's status; a failed job's reason and last log lines (exit 1)."""
    from steward.cluster.jobs import job_info, raise_if_failed, ray_reason

    info = job_info(address, job_id)
    reason = ray_reason(info)
    console.print(f"{job_id}: {info.status}" + (f" - {reason}" if reason else ""), markup=False)
    raise_if_failed(address, info)


@jobs_app.command("logs")
@user_errors
def jobs_logs(
    job_id: JobId,
    address: JobsAddress = None,
    follow_: Annotated[
        bool,
        typer.Option("--follow", "-f", help="Print new lines as they come until the job ends (exit 1 if it failed)."),
    ] = False,
) -> None:
    """Print a job's log (stdout holds the log alone; the final status goes to stderr)."""
    from steward.cluster.jobs import JobFailed, follow, logs, ray_reason

    if not follow_:
        _write(logs(address, job_id))
        return
    info = follow(address, job_id, _write)
    reason = ray_reason(info)
    if info.status in ("FAILED", "STOPPED"):
        raise JobFailed(f"job {job_id} {info.status}" + (f": {reason}" if reason else ""))
    typer.echo(f"job {job_id} {info.status}", err=True)


@jobs_app.command("stop")
@user_errors
def jobs_stop(
    job_id: JobId,
    address: JobsAddress = None,
    wait: Annotated[bool, typer.Option(help="Return once the job has stopped (else once it was asked to).")] = True,
) -> None:
    """Stop a running job (exit 0 also when it had already ended: it is not running either way)."""
    from steward.cluster.jobs import job_info, stop, stop_waiting

    if not stop(address, job_id):
        console.print(f"{job_id} had already ended: {job_info(address, job_id).status}", markup=False)
    elif wait:
        console.print(f"{job_id} {stop_waiting(address, job_id).status}", markup=False)
    else:
        console.print(f"stopping {job_id}", markup=False)


@user_errors
def k8s(
    spec: Spec,
    set_: Sets = None,
    kind: Annotated[str, typer.Option(help="rayjob (train, or tune when declared) or rayservice (serve).")] = "rayjob",
    image: Annotated[str, typer.Option(help="Image with steward installed (cluster/Dockerfile).")] = "steward:0.1.0",
    run: Annotated[str | None, typer.Option(help="rayservice: run folder on the runs volume to serve.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="rayservice: serve a registered version (models:/NAME@ALIAS) from tracking.uri's registry."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the manifests here instead of printing them.")] = None,
    api_keys_secret: Annotated[
        str | None,
        typer.Option(
            help="rayservice with serve.auth: Secret holding the keys under `api-keys` (default NAME-api-keys)."
        ),
    ] = None,
    policy: PolicyOption = None,
) -> None:
    """Write KubeRay manifests for the spec (and the policy in force): a RayJob (with its spec ConfigMap) or a
    RayService."""
    from steward.cluster.k8s import api_keys_secret_command, dump, manifests

    if kind not in ("rayjob", "rayservice"):
        raise StewardError(f"--kind {kind}: use rayjob or rayservice")
    job = load_job(spec, set_ or [])
    admit(job, policy, "k8s", str(spec))  # the one place manifests leave steward
    text = dump(manifests(job, kind, image, run, api_keys_secret, model))  # type: ignore[arg-type]
    secret = api_keys_secret_command(job, api_keys_secret) if kind == "rayservice" else None
    if out is None:
        print(text, end="")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote [bold]{out}[/] (kubectl apply -f {out})")
    if secret:  # on stderr: stdout may be piped to kubectl apply
        typer.echo(f"the pods start once the API-keys Secret exists: {secret}", err=True)
