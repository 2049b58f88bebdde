"""The one owner of a run's life: create (or resume) the run folder, its state, its audit events, publishing to
storage, and the stages the spec declares in order (steward.stages does each one).

Every command that makes a run comes through here: `steward train`, `tune`, `run`, `bench`, and so the entrypoint
of a `steward submit` job too. A run ends in one of three states, each recorded in status.json and the audit log
and published before the error (if any) reaches the CLI:
- succeeded;
- interrupted (Ctrl-C, or a sweep left unfinished): continue it with --resume;
- failed: the error is recorded; an error that is neither the user's nor a failed run is a bug, and its traceback
  goes to the run's own log (RUN_LOG), which the CLI points at.

Before a run folder is made, the spec (and every trial and bench cell it can become) is admitted by the policy in
force (steward.govern.policy): the CLI names its --policy and the spec's file, any other caller gets the policy of
$STEWARD_POLICY or ./steward.policy.yaml. A refused spec makes no run folder and starts no Ray.
"""

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from steward.bench.run import bench_job
from steward.errors import RunFailed, RunInterrupted, StewardError
from steward.govern.events import record_run
from steward.govern.policy import Admission
from steward.runs import create_run, publish, resume_run, run_uri, set_status, spec_hash
from steward.serve.registry import register
from steward.spec import JobSpec
from steward.stages import evaluate_target, keep_sweep_model, train_model
from steward.storage import fetch_run, is_uri
from steward.tracking import Child, Tracker, check_tensorboard, ui_command, write_tensorboard
from steward.tune.finish import SweepResult, tune_job

RUN_LOG = "steward.log"  # a bug's traceback, inside the run folder
ACTIONS = {"train": "train", "sweep": "tune", "bench": "bench"}  # the command that makes each kind of run


@dataclass
class Run:
    """A run folder from its start to its end state. `kind` is train, sweep or bench."""

    job: JobSpec
    kind: str
    run_dir: Path
    resumed: bool = False
    console: Console | None = None
    tracker: Tracker = field(default_factory=lambda: Tracker(print))

    @property
    def uri(self) -> str | None:
        return run_uri(self.job, self.run_dir)

    @property
    def where(self) -> str:
        return self.uri or str(self.run_dir)

    @classmethod
    def start(
        cls,
        job: JobSpec,
        kind: str,
        resume: str | None = None,
        console: Console | None = None,
        admission: Admission | None = None,
    ) -> "Run":
        """Admit the spec, then a new run folder, or the one `resume` names (checked), marked running, audited and
        published."""
        (admission or Admission(ACTIONS[kind], job.name)).admit(job)
        check_tensorboard(job)
        if resume:
            job, run_dir = resume_run(job, resume, kind)
            # the spec's train settings may have changed: record the hash of what runs now
            set_status(run_dir, "running", spec_hash=spec_hash(job), error=None)
            publish(job, run_dir)
        else:
            run_dir = create_run(job)
        run = cls(job, kind, run_dir, resumed=resume is not None, console=console)
        record_run("run.started", run_dir, job.output_dir, kind=kind, resumed=run.resumed)
        run.tracker = Tracker.start(job, run_dir, kind, run.warn)
        if console is not None:
            staged = f" (staged in {escape(str(run_dir))})" if run.uri else ""
            console.print(f"run folder [bold]{escape(run.where)}[/]{staged}")
        return run

    def warn(self, message: str) -> None:
        (self.console or Console(stderr=True)).print(f"[yellow]warning:[/] {escape(message)}")

    @contextlib.contextmanager
    def stages(self) -> Iterator["Run"]:
        """Run the stages inside; any way out but success ends the run as interrupted or failed, recorded first."""
        try:
            yield self
        except (KeyboardInterrupt, RunInterrupted) as err:
            self._end("interrupted", "run.interrupted")
            if isinstance(err, RunInterrupted):
                raise
            verb = "tune" if self.kind == "sweep" else self.kind
            raise RunInterrupted(
                f"{self.kind} interrupted; continue it with: steward {verb} SPEC --resume {self.where}"
            ) from None
        except BaseException as err:
            message = str(err) or type(err).__name__
            self._end("failed", "run.failed", error=message)
            if not isinstance(err, (StewardError, RunFailed)):
                err.run_log = self.run_dir / RUN_LOG  # type: ignore[attr-defined]
            raise

    def succeed(self, event: str = "run.finished", status: dict | None = None, **audited: Any) -> None:
        """Record success: status.json (published last, so a run cut short while uploading never reads as
        succeeded), the audit event, which carries the data and model hashes from the card, and the model's
        registration (registry.json is published with the run)."""
        set_status(self.run_dir, "succeeded", **(status or {}))
        record_run(event, self.run_dir, self.job.output_dir, kind=self.kind, **audited)
        version = register(self.tracker, self.job, self.run_dir) if self.kind != "bench" else None
        publish(self.job, self.run_dir)
        self._track("succeeded")
        if self.console is not None and self.tracker.on:
            self.console.print(f"tracked in MLflow: [bold]{escape(ui_command(self.tracker.uri))}[/]")
        if self.console is not None and version is not None:
            self.console.print(f"registered {version}", markup=False)

    def _end(self, state: str, event: str, **fields: Any) -> None:
        set_status(self.run_dir, state, **fields)
        record_run(event, self.run_dir, self.job.output_dir, kind=self.kind, **fields)
        # storage that cannot take the run must not hide why it ended
        with contextlib.suppress(Exception):
            publish(self.job, self.run_dir)
        self._track(state)

    def _track(self, state: str) -> None:
        """The run's end in MLflow, and its TensorBoard event files; neither can fail the run."""
        self.tracker.finish(self.run_dir, state)
        if self.job.tracking.tensorboard:
            try:
                write_tensorboard(self.run_dir)
            except Exception as err:  # noqa: BLE001 - the run folder holds the same numbers
                self.warn(f"tracking.tensorboard: event files not written ({err})")


@dataclass(frozen=True)
class Trained:
    """A run that made a model: its folder and metrics.json; a sweep's rows and best trial too."""

    run_dir: Path
    result: dict
    sweep: SweepResult | None = None


def train(
    job: JobSpec,
    address: str | None = None,
    resume: str | None = None,
    console: Console | None = None,
    progress: Callable[[Path], contextlib.AbstractContextManager] | None = None,
    admission: Admission | None = None,
) -> Trained:
    """`steward train`: train, evaluate, write the card; `progress(run_dir)` shows the epochs while it trains."""
    run = Run.start(job, "train", resume, console, admission)
    with run.stages(), progress(run.run_dir) if progress else contextlib.nullcontext():
        result = train_model(run.job, run.run_dir, address)
    run.succeed(status={"headline": result["overall"]})
    return Trained(run.run_dir, result)


def tune(
    job: JobSpec,
    address: str | None = None,
    resume: str | None = None,
    console: Console | None = None,
    admission: Admission | None = None,
) -> Trained:
    """`steward tune`: the sweep, then the run's model as tune.on_finish says, evaluated, with its card."""
    if job.tune is None:
        raise StewardError("tune: the spec has no `tune` section; add one (see `steward schema`) or use steward train")
    run = Run.start(job, "sweep", resume, console, admission)
    with run.stages():
        sweep = tune_job(run.job, run.run_dir, address, resume=run.resumed)
        run.tracker.log_children(trial_runs(sweep, job.tune.metric))
        result = keep_sweep_model(run.job, sweep, run.run_dir, address)
    best = sweep.best
    run.succeed(
        "sweep.finished",
        status={"headline": result["overall"], "best_trial": best.trial_id},
        trials=len(sweep.rows),
        best_trial=best.trial_id,
        metric=job.tune.metric,
        best_metric=best.metric,
    )
    return Trained(run.run_dir, result, sweep)


def trial_runs(sweep: SweepResult, metric: str) -> list[Child]:
    """The sweep's trials as child runs: their configuration, their metric's curve, how they ended."""
    return [
        Child(
            name=row.trial_id,
            params=row.config,
            curves={metric: row.curve},
            tags={"steward.trial_status": row.status} | ({"steward.error": row.error[:5000]} if row.error else {}),
            state="failed" if row.status == "error" else "succeeded",
        )
        for row in sweep.rows
    ]


def train_or_tune(
    job: JobSpec,
    address: str | None = None,
    console: Console | None = None,
    admission: Admission | None = None,
    **kw: Any,
) -> Trained:
    """`steward run`'s model: a sweep when the spec declares one, else training."""
    if job.tune:
        return tune(job, address, console=console, admission=admission)
    return train(job, address, console=console, admission=admission, **kw)


def bench(
    job: JobSpec, address: str | None = None, console: Console | None = None, admission: Admission | None = None
) -> Path:
    """`steward bench`: every cell of the spec's matrix, interleaved and repeated; bench.json in the run folder."""
    if job.bench is None:
        example = "bench: {matrix: {distributed.zero_stage: [0, 2]}}"
        raise StewardError(f"bench: the spec has no `bench` section; add one, e.g. `{example}`")
    if is_uri(job.output_dir):  # cells deploy and read back what they trained: they need a folder
        raise StewardError(f"output_dir {job.output_dir}: steward bench writes to a folder; pass --set output_dir=DIR")
    run = Run.start(job, "bench", console=console, admission=admission)
    with run.stages():
        bench_job(job, run.run_dir, address, console or Console())
    run.succeed()
    return run.run_dir


def evaluate(target: str, data: JobSpec | None = None, split: str | None = None) -> tuple[dict, Path]:
    """`steward evaluate`: a run folder (or its URI), its model folder, or a checkpoint; no run is made."""
    folder = fetch_run(target, "evaluate") if is_uri(target) else Path(target)
    return evaluate_target(folder, data, split)
