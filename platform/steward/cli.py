"""`steward`: the command line. Thin: parse, call the library, print; user errors exit 2, never a traceback."""

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.markup import escape
from rich.table import Table

from steward.bench.commands import bench_app
from steward.cluster.commands import jobs_app, k8s, submit
from steward.commands import Address, Sets, Spec, console, errors, user_errors
from steward.govern.commands import PolicyOption, audit_app, card, policy_app
from steward.govern.policy import PolicyViolation, admit
from steward.serve.commands import Override, deploy_and_wait, serve_app
from steward.spec import JobSpec, SpecError, load_job
from steward.storage import is_uri

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Train, tune, serve and watch models on Ray.")
app.command("card")(card)
app.add_typer(audit_app, name="audit")
app.add_typer(policy_app, name="policy")
app.command()(submit)
app.command()(k8s)
app.add_typer(jobs_app, name="jobs")
app.add_typer(bench_app, name="bench")
app.add_typer(serve_app, name="serve")


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
        console.print(f"[green]ok[/] {path}: {spec.name} - {spec.model.family} on {spec.data.source}, "
                      f"{dist.num_workers} worker(s), {dist.strategy} ZeRO-{dist.zero_stage}")  # fmt: skip
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
def train(
    spec: Spec,
    set_: Sets = None,
    address: Address = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue this run folder (or its URI in cluster storage) from its checkpoint.")
    ] = None,
    policy: PolicyOption = None,
) -> None:
    """Train the spec's model; writes a run folder and prints the results table."""
    job = load_job(spec, set_ or [])
    admit(job, policy, "train", str(spec))
    _train(job, address, resume)


@app.command()
@user_errors
def run(
    spec: Spec,
    set_: Sets = None,
    address: Address = None,
    serve: Annotated[bool, typer.Option(help="Deploy after training when the spec has a serve section.")] = True,
    port: Annotated[int, typer.Option(help="HTTP port Serve listens on.")] = 8000,
    policy: PolicyOption = None,
    override_fairness_gate: Override = None,
) -> None:
    """Run every stage the spec declares: tune (when declared) or train, evaluate, then deploy (serve section)."""
    job = load_job(spec, set_ or [])
    admit(job, policy, "run", str(spec))
    if serve and job.serve is not None and address in (None, "", "local"):
        from steward.serve.deploy import prefer_high_throughput

        prefer_high_throughput(job.serve)  # before training starts the embedded Ray that will also serve
    run_dir = _tune(job, address, None) if job.tune else _train(job, address, None)
    if serve and job.serve is not None:
        deploy_and_wait(job, run_dir, address, "127.0.0.1", port, override_fairness_gate)


@app.command("tune")
@user_errors
def tune_command(
    spec: Spec,
    set_: Sets = None,
    address: Address = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue this interrupted sweep's run folder (or its URI in cluster storage).")
    ] = None,
    policy: PolicyOption = None,
) -> None:
    """Sweep the spec's `tune` section with Ray Tune; keep or retrain the best trial as its on_finish says."""
    job = load_job(spec, set_ or [])
    if job.tune is None:
        raise ValueError(f"{spec}: no `tune` section; add one (see `steward schema`) or use `steward train`")
    admit(job, policy, "tune", str(spec))
    _tune(job, address, resume)


def _train(job: JobSpec, address: str | None, resume: str | None) -> Path:
    from steward.govern.events import record_run
    from steward.runs import create_run, publish, resume_run, run_uri, set_status, spec_hash
    from steward.train.launch import train_job
    from steward.train.progress import HistoryProgress

    job, run_dir = resume_run(job, resume, "train") if resume else (job, create_run(job))
    if resume:  # the spec's train settings may have changed: record the hash of what runs now
        set_status(run_dir, "running", spec_hash=spec_hash(job), error=None)
        publish(job, run_dir)
    record_run("run.started", run_dir, job.output_dir, kind="train", resumed=resume is not None)
    _print_run_folder(run_dir, run_uri(job, run_dir))
    try:
        with HistoryProgress(run_dir / "history.jsonl", job.train.epochs, console):
            result = train_job(job, run_dir, address)
    except BaseException as err:
        set_status(run_dir, "failed", error=str(err) or type(err).__name__)
        record_run("run.failed", run_dir, job.output_dir, kind="train", error=str(err) or type(err).__name__)
        _publish_ending(job, run_dir)
        raise
    set_status(run_dir, "succeeded", headline=result["overall"])
    record_run("run.finished", run_dir, job.output_dir, kind="train")
    publish(job, run_dir)  # status.json last: a run cut short while uploading never reads as succeeded
    _print_metrics(result, run_dir)
    return run_dir


def _print_run_folder(run_dir: Path, uri: str | None) -> None:
    staged = f" (staged in {escape(str(run_dir))})" if uri else ""
    console.print(f"run folder [bold]{escape(uri or str(run_dir))}[/]{staged}")


def _publish_ending(job: JobSpec, run_dir: Path) -> None:
    """Publish a run that failed or was interrupted; storage that cannot take it must not hide why it ended."""
    from steward.runs import publish

    with contextlib.suppress(ValueError):
        publish(job, run_dir)


def _tune(job: JobSpec, address: str | None, resume: str | None) -> Path:
    from steward.govern.events import record_run
    from steward.runs import create_run, publish, resume_run, run_uri, set_status, spec_hash
    from steward.tune.finish import tune_job
    from steward.tune.launch import SweepInterrupted
    from steward.tune.report import results_table

    job, run_dir = resume_run(job, resume, "sweep") if resume else (job, create_run(job))
    assert job.tune is not None
    if resume:
        set_status(run_dir, "running", spec_hash=spec_hash(job), error=None)
        publish(job, run_dir)
    record_run("run.started", run_dir, job.output_dir, kind="sweep", resumed=resume is not None)
    _print_run_folder(run_dir, run_uri(job, run_dir))
    try:
        result, rows, best = tune_job(job, run_dir, address, resume=resume is not None)
    except SweepInterrupted:
        set_status(run_dir, "interrupted")
        record_run("run.interrupted", run_dir, job.output_dir, kind="sweep")
        _publish_ending(job, run_dir)
        raise
    except BaseException as err:
        set_status(run_dir, "failed", error=str(err) or type(err).__name__)
        record_run("run.failed", run_dir, job.output_dir, kind="sweep", error=str(err) or type(err).__name__)
        _publish_ending(job, run_dir)
        raise
    set_status(run_dir, "succeeded", headline=result["overall"], best_trial=best.trial_id)
    record_run("sweep.finished", run_dir, job.output_dir, trials=len(rows), best_trial=best.trial_id,
               metric=job.tune.metric, best_metric=best.metric)  # fmt: skip
    publish(job, run_dir)  # status.json last, as for training
    console.print(results_table(rows, job.tune.metric, list(job.tune.search_space), best))
    console.print(f"best trial {best.trial_id}: {job.tune.metric} = {best.metric:.4f} -> best.yaml")
    _print_metrics(result, run_dir)
    console.print("sweep: results.csv, trials.png, best.yaml, trials/<trial>/ (each trial's own run folder)")
    return run_dir


@app.command()
@user_errors
def evaluate(
    target: Annotated[
        str,
        typer.Argument(help="A run folder (or its URI in cluster storage), its model/ folder, or a checkpoint."),
    ],
    data: Annotated[Path | None, typer.Option(help="Evaluate on this spec's data instead of the run's.")] = None,
    split: Annotated[str | None, typer.Option(help="validation or test (default: the spec's evaluate.split).")] = None,
) -> None:
    """Evaluate a saved model: a run folder, its model/ folder, or one of its checkpoints."""
    from steward.evaluate import evaluate_target
    from steward.storage import fetch_run

    folder = fetch_run(target, "evaluate") if is_uri(target) else Path(target)
    result, run_dir = evaluate_target(folder, load_job(data) if data else None, split)
    _print_metrics(result, run_dir)


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


privacy_app = typer.Typer(no_args_is_help=True, help="Privacy of training data: see what would be masked.")
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("scan")
@user_errors
def privacy_scan(spec: Spec, set_: Sets = None) -> None:
    """Count the PII the spec's privacy section would mask, per column and entity type, on a sample (no values)."""
    from steward.data.privacy import scan

    report = scan(load_job(spec, set_ or []))
    table = Table("column", "entity type", "found", title=f"PII found in a sample of {report['rows']} rows")
    for column, found in report["entities"].items():
        for entity, count in sorted(found.items(), key=lambda kv: -kv[1]):
            table.add_row(column, entity, str(count))
        if not found:
            table.add_row(column, "(none)", "0")
    console.print(table)
    if report["dropped_columns"]:
        console.print(f"dropped columns: {', '.join(report['dropped_columns'])}")
    if "k_anonymity" in report:
        k = report["k_anonymity"]
        console.print(f"k-anonymity on the sample: k={k['k']} achieved {k['achieved_k']} at levels {k['levels']}, "
                      f"{k['suppressed_rows']} of {k['rows']} rows suppressed", markup=False)  # fmt: skip


@app.command()
@user_errors
def explain(
    run: Annotated[Path, typer.Argument(help="A run folder (runs/<name>/<run-id>).")],
    input_: Annotated[
        str | None,
        typer.Option("--input", help='Raw instances: a JSON file, or inline JSON (a list, or {"instances": [...]}).'),
    ] = None,
    target: Annotated[str | None, typer.Option(help="Class label to explain (default: each predicted class).")] = None,
    steps: Annotated[int | None, typer.Option(help="Integrated Gradients steps (default: explain.n_steps).")] = None,
    permutation: Annotated[
        bool, typer.Option(help="Also permutation importance on the validation split (numeric inputs).")
    ] = False,
) -> None:
    """Explain a run's model: Integrated Gradients of instances, permutation importance; writes RUN/explanations/."""
    instances = _read_instances(input_) if input_ is not None else None
    from steward.explain.run import explain_run  # torch and captum: only once the input is known to be good

    folder, files = explain_run(run, instances, target=target, n_steps=steps, permutation=permutation)
    console.print(f"explanations: [bold]{folder}[/]")
    for path in files:
        console.print(f"  {path.name}", markup=False)


def _read_instances(raw: str) -> list:
    """Instances from a JSON file or inline JSON: a list, or an object with an `instances` list."""
    inline = raw.lstrip().startswith(("[", "{"))
    if not inline and not Path(raw).is_file():
        raise ValueError(f"--input: {raw!r} is neither a JSON file nor inline JSON (a list or an object)")
    try:
        payload = json.loads(raw if inline else Path(raw).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--input: not valid JSON ({err}); give a JSON file or inline JSON") from None
    instances = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(instances, list) or not instances:
        raise ValueError('--input: expected a non-empty list of instances, or {"instances": [...]}')
    return instances


def _print_metrics(result: dict, run_dir: Path) -> None:
    table = Table(title=f"{result['split']} split, {result['num_samples']} samples")
    names = list(result["overall"])
    table.add_column("rows")
    for name in names:
        table.add_column(name, justify="right")
    table.add_row("all", *(f"{result['overall'][n]:.4f}" for n in names))
    for column, groups in result.get("groups", {}).items():
        for value, metrics in groups.items():
            table.add_row(f"{column}={value} (n={metrics['count']})", *(f"{metrics[n]:.4f}" for n in names))
    console.print(table)
    console.print(f"artifacts: [bold]{run_dir}[/] (model/, metrics.json, history.jsonl, curves.png, spec.yaml)")


monitor_app = typer.Typer(no_args_is_help=True, help="What the monitors of served models saw.")
app.add_typer(monitor_app, name="monitor")


@monitor_app.command("report")
@user_errors
def monitor_report(
    target: Annotated[Path, typer.Argument(help="Run folder, run/monitor/<deployment> folder, or deployment name.")],
    output_dir: Annotated[Path, typer.Option(help="Folder of run folders, to find a deployment by name.")] = Path(
        "runs"
    ),
    out: Annotated[Path | None, typer.Option(help="Folder for report.html (default: the monitor folder).")] = None,
) -> None:
    """Write an HTML page with drift over time, per-group rates and reference-vs-live histograms."""
    from steward.monitor.report import find_monitor, write_report

    page = write_report(find_monitor(target, output_dir), out)
    console.print(f"wrote [bold]{page}[/]")


def main() -> None:
    app()
