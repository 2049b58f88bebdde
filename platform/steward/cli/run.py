"""The commands that make or read a model: `steward train`, `tune`, `run`, `evaluate`, `explain`, `privacy scan`,
`monitor report`. Each imports the heavy stack only when it runs."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from steward.cli.common import Address, PolicyOption, Sets, Spec, console, user_errors
from steward.cli.serve import Override, deploy_and_wait
from steward.errors import StewardError
from steward.govern.policy import Admission
from steward.spec import JobSpec, load_job

if TYPE_CHECKING:
    from steward.pipeline import Trained
    from steward.train.estimate import FitReport

Resume = Annotated[
    str | None, typer.Option(help="Continue this run folder (or its URI in cluster storage) where it stopped.")
]


@user_errors
def train(spec: Spec, set_: Sets = None, address: Address = None, resume: Resume = None, policy: PolicyOption = None):
    """Train the spec's model; writes a run folder and prints the results table."""
    from steward import pipeline
    from steward.train.progress import HistoryProgress

    job = load_job(spec, set_ or [])

    def progress(run_dir: Path) -> HistoryProgress:
        return HistoryProgress(run_dir / "history.jsonl", job.train.epochs, console)

    trained = pipeline.train(job, address, resume, console, progress, Admission("train", str(spec), policy))
    print_metrics(trained.result, trained.run_dir)


@user_errors
def tune(spec: Spec, set_: Sets = None, address: Address = None, resume: Resume = None, policy: PolicyOption = None):
    """Sweep the spec's `tune` section with Ray Tune; keep or retrain the best trial as its on_finish says."""
    from steward import pipeline

    job = load_job(spec, set_ or [])
    print_sweep(job, pipeline.tune(job, address, resume, console, Admission("tune", str(spec), policy)))


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
    from steward import pipeline

    job = load_job(spec, set_ or [])
    trained = pipeline.train_or_tune(job, address, console, Admission("run", str(spec), policy))
    print_sweep(job, trained) if trained.sweep else print_metrics(trained.result, trained.run_dir)
    if serve and job.serve is not None:
        deploy_and_wait(job, trained.run_dir, address, "127.0.0.1", port, override_fairness_gate)


@user_errors
def estimate(spec: Spec, set_: Sets = None, address: Address = None) -> None:
    """Estimate each worker's peak memory for the spec against the Ray nodes' memory; exit 2 when it cannot fit."""
    from steward.train.estimate import estimate_job  # torch, transformers and Ray: only when it runs

    job = load_job(spec, set_ or [])
    with console.status("building the model on the meta device, asking Ray for its nodes' memory"):
        report = estimate_job(job, address)
    print_estimate(job, report)
    if report.problem:
        raise StewardError(report.problem)


def print_estimate(job: JobSpec, report: "FitReport") -> None:
    from steward.train.estimate import usable

    gib, size, found = 2**30, report.size, report.estimate
    dist = job.distributed
    setting = f"{dist.strategy} ZeRO-{dist.zero_stage}" + (
        f", offload optimizer {dist.offload_optimizer}, params {dist.offload_params}"
        if dist.strategy == "deepspeed"
        else ""
    )
    console.print(
        f"{size.parameters / 1e6:.1f} M parameters ({size.trainable / 1e6:.1f} M trained), {dist.num_workers} "
        f"workers, {setting}, {job.train.precision}, micro-batch {job.data.batch_size} x {job.data.max_length} tokens; "
        f"ZeRO formula: {found.formula / gib:.2f} GiB of model states a worker",
        markup=False,
    )
    table = Table(
        title="peak memory per worker, GiB (free: its share of what Ray found free on its node, less Ray's own)"
    )
    for header in ("worker", "node", "states", "buckets", "activ.", "runtime", "total", "free"):
        table.add_column(header, justify="left" if header in ("worker", "node") else "right")
    worker = 0
    for node, count in report.placed:
        for _ in range(count):
            parts = (found.model_states, found.buckets, found.activations, found.runtime, found.total)
            table.add_row(
                str(worker), node.address, *(f"{p / gib:.2f}" for p in parts), f"{usable(node) / count / gib:.2f}"
            )
            worker += 1
    console.print(table)
    if dist.use_gpu:
        console.print("[yellow]GPU workers: their model states live in GPU memory, which Ray does not report[/]")
    elif report.problem is None:
        console.print("[green]fits[/]: every worker's estimate is within its share of its node's memory")


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
    from steward import pipeline

    result, run_dir = pipeline.evaluate(target, load_job(data) if data else None, split)
    print_metrics(result, run_dir)


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
    instances = read_instances(input_) if input_ is not None else None
    from steward.explain.run import explain_run  # torch and captum: only once the input is known to be good

    folder, files = explain_run(run, instances, target=target, n_steps=steps, permutation=permutation)
    console.print(f"explanations: [bold]{folder}[/]")
    for path in files:
        console.print(f"  {path.name}", markup=False)


def read_instances(raw: str) -> list:
    """Instances from a JSON file or inline JSON: a list, or an object with an `instances` list."""
    inline = raw.lstrip().startswith(("[", "{"))
    if not inline and not Path(raw).is_file():
        raise StewardError(f"--input: {raw!r} is neither a JSON file nor inline JSON (a list or an object)")
    try:
        payload = json.loads(raw if inline else Path(raw).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StewardError(f"--input: not valid JSON ({err}); give a JSON file or inline JSON") from None
    instances = payload.get("instances") if isinstance(payload, dict) else payload
    if not isinstance(instances, list) or not instances:
        raise StewardError('--input: expected a non-empty list of instances, or {"instances": [...]}')
    return instances


privacy_app = typer.Typer(no_args_is_help=True, help="Privacy of training data: see what would be masked.")


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
        achieved = f"k={k['k']} achieved {k['achieved_k']} at levels {k['levels']}"
        suppressed = f"{k['suppressed_rows']} of {k['rows']} rows suppressed"
        console.print(f"k-anonymity on the sample: {achieved}, {suppressed}", markup=False)


monitor_app = typer.Typer(no_args_is_help=True, help="What the monitors of served models saw.")


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


def print_metrics(result: dict, run_dir: Path) -> None:
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


def print_sweep(job: JobSpec, trained: "Trained") -> None:
    from steward.tune.report import results_table

    sweep = trained.sweep
    assert job.tune is not None and sweep is not None
    console.print(results_table(sweep.rows, job.tune.metric, list(job.tune.search_space), sweep.best))
    console.print(f"best trial {sweep.best.trial_id}: {job.tune.metric} = {sweep.best.metric:.4f} -> best.yaml")
    print_metrics(trained.result, trained.run_dir)
    console.print("sweep: results.csv, trials.png, best.yaml, trials/<trial>/ (each trial's own run folder)")
