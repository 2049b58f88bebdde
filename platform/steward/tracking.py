"""Experiment tracking on MLflow: each steward run is an MLflow run, written from its run folder.

The run folder stays the record; MLflow shows it where teams already compare runs. The embedded default is a SQLite
store in output_dir (`mlflow ui --backend-store-uri sqlite:///...` opens it); `tracking.uri` or
$MLFLOW_TRACKING_URI points at an MLflow server. Logging never fails a run: the first call that MLflow refuses, or
a server that does not answer, turns tracking off for the rest of the run with one warning.

What a run logs: the resolved spec, flattened, as parameters (once: a resumed run keeps its first ones); tags
(spec hash, steward version, run folder, kind, state); when it ends, every epoch's metrics at their optimizer
step, each step's loss, the test metrics overall and per group, and the spec, metrics, curves, model card and
reference profile summary as artifacts. A sweep's trials are child runs of the sweep's run; a succeeded run's model
is registered (steward.serve.registry).
"""

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steward import __version__
from steward.errors import StewardError
from steward.runs import read_history, spec_hash
from steward.spec import JobSpec
from steward.storage import is_uri

STORE = "mlflow.db"  # the embedded store, in output_dir
ARTIFACTS = "mlartifacts"  # its artifacts, beside it
TENSORBOARD = "tensorboard"  # in the run folder: TensorBoard's event files, when tracking.tensorboard is set
TRACKED = "tracking.json"  # in the run folder: which MLflow run it is, for a resumed run to continue
# Logged as artifacts under their own names; model/reference.json is the summary of the reference profile.
RUN_FILES = ("spec.yaml", "metrics.json", "curves.png", "model_card.md", "model_card.json")
LOGGED_FILES = (*RUN_FILES, "model/reference.json", "bench.json", "bench.md")
STATES = {"succeeded": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}
# MLflow's own limits: a batch's size, a parameter's value.
BATCH, PARAM_CHARS = 1000, 6000
# Unless the user says otherwise: retries and timeout of MLflow's HTTP client (its defaults retry a dead server for
# minutes), and no usage reports to MLflow's makers (steward's embedded Ray sends none either).
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
Point = tuple[str, float, int, float | None]  # a metric's name, value, step and time (None: now)
NICER = 10  # the opening thread's niceness
NOT_A_NAME = re.compile(r"[^A-Za-z0-9_\-. :/]")  # what MLflow refuses in a metric or parameter name


def tracking_uri(job: JobSpec) -> str | None:
    """Where the job's runs are logged; None when tracking is off, or output_dir is cluster storage and no
    tracking URI is given (a SQLite store needs a local folder)."""
    if not job.tracking.enabled:
        return None
    uri = job.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if is_uri(job.output_dir):
        return None
    return f"sqlite:///{(Path(job.output_dir) / STORE).resolve()}"


def check_tensorboard(job: JobSpec) -> None:
    """tracking.tensorboard needs the tensorboard package: refused before the run starts when it is missing."""
    if job.tracking.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise StewardError(
            "tracking.tensorboard: the tensorboard package is not installed; pip install 'steward[tensorboard]' "
            "or set tracking.tensorboard: false"
        )


def write_tensorboard(run_dir: Path) -> Path:
    """The run's history (every epoch's numbers, each step's loss) as TensorBoard event files in run_dir/TENSORBOARD,
    rewritten whole: a resumed run's history holds its earlier epochs too."""
    from torch.utils.tensorboard import SummaryWriter

    folder = run_dir / TENSORBOARD
    shutil.rmtree(folder, ignore_errors=True)
    writer = SummaryWriter(str(folder))
    try:
        for key, value, step, at in history_metrics(read_history(run_dir / "history.jsonl")):
            writer.add_scalar(key, value, step, walltime=at)
    finally:
        writer.close()
    return folder


def ui_command(uri: str) -> str:
    """Where to look at the store at `uri`: the command that opens a local store in MLflow's UI, or the server."""
    return f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri


@dataclass
class Child:
    """A child run (a sweep's trial): its parameters, metric curves as (step, value) and tags."""

    name: str
    params: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    state: str = "succeeded"


class Tracker:
    """One steward run's MLflow run, or nothing at all when tracking is off."""

    def __init__(self, warn: Callable[[str], None]):
        self.warn = warn
        self.client: Any = None
        self.uri = ""
        self.run_id = ""
        self.experiment_id = ""
        self.logged_until = 0.0  # the time of the last history record logged: a resumed run logs only what is newer
        self._opening: threading.Thread | None = None

    @classmethod
    def start(cls, job: JobSpec, run_dir: Path, kind: str, warn: Callable[[str], None]) -> "Tracker":
        """Open (or, for a resumed run, reopen) the run's MLflow run and log its parameters and tags.

        In a thread of its own: importing MLflow and opening its store take seconds, which the run's own start
        (Ray, the workers) hides; everything else waits for it.
        """
        tracker = cls(warn)
        uri = tracking_uri(job)
        if uri is not None:
            registers = job.tracking.registry and kind != "bench"
            tracker._opening = threading.Thread(
                target=tracker.guard, args=(lambda: tracker._open(job, run_dir, kind, uri, registers),), daemon=True
            )
            tracker._opening.start()
        elif job.tracking.enabled:
            warn(
                f"tracking: output_dir {job.output_dir} is not a local folder for an MLflow store; set tracking.uri "
                "or $MLFLOW_TRACKING_URI to an MLflow server to track this run"
            )
        return tracker

    @property
    def on(self) -> bool:
        if self._opening is not None:
            self._opening.join()
            self._opening = None
        return self.client is not None

    def finish(self, run_dir: Path, state: str) -> None:
        """Log what the run folder holds now (metrics, artifacts) and close the MLflow run with the run's state."""
        if self.on:
            self.guard(lambda: self._close(run_dir, state))

    def log_children(self, children: Iterable[Child]) -> None:
        """A child run per item (a sweep's trials), under this run."""
        if self.on:
            self.guard(lambda: self._children(children))

    def guard(self, call: Callable[[], Any]) -> None:
        try:
            call()
        except Exception as err:  # noqa: BLE001 - logging never fails a run: any refusal turns tracking off
            self.client = None
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            self.warn(f"tracking: MLflow at {self.uri} failed ({reason}); the run goes on without it")

    def _open(self, job: JobSpec, run_dir: Path, kind: str, uri: str, registers: bool) -> None:
        # below the run's own processes: this work fills their idle moments rather than competing with them
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICER)
        self.uri = uri
        self.client = mlflow_client(uri)
        self.experiment_id = self._experiment(job, uri)
        before = json.loads((run_dir / TRACKED).read_text()) if (run_dir / TRACKED).exists() else {}
        tags = {"steward.kind": kind, "steward.run_folder": str(run_dir), "steward.spec_hash": spec_hash(job)}
        tags |= {"steward.version": __version__, "steward.state": "running"}
        if before.get("uri") == uri:
            self.run_id, self.logged_until = before["run_id"], float(before.get("logged_until", 0))
            self.client.update_run(self.run_id, status="RUNNING")
            self._batch(tags=tags)
            return
        run = self.client.create_run(self.experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        self._remember(run_dir)
        self._batch(params=flatten(job.model_dump(mode="json")))
        if registers:
            warm_model_logging()

    def _remember(self, run_dir: Path) -> None:
        (run_dir / TRACKED).write_text(
            json.dumps({"uri": self.uri, "run_id": self.run_id, "logged_until": self.logged_until})
        )

    def _experiment(self, job: JobSpec, uri: str) -> str:
        experiment = job.tracking.experiment or job.name
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            return found.experiment_id
        # the embedded store keeps artifacts beside it, not in ./mlruns of whatever folder the command ran in
        location = (
            (Path(uri.removeprefix("sqlite:///")).parent / ARTIFACTS).as_uri() if uri.startswith("sqlite:") else None
        )
        try:
            return self.client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another run made it meanwhile
            return self.client.get_experiment_by_name(experiment).experiment_id

    def _close(self, run_dir: Path, state: str) -> None:
        records = [r for r in read_history(run_dir / "history.jsonl") if r.get("time", 0) > self.logged_until]
        metrics = list(history_metrics(records))
        if (run_dir / "metrics.json").exists():
            result = json.loads((run_dir / "metrics.json").read_text())
            metrics += [(key, value, 0, None) for key, value in result_metrics(result)]
        self._batch(metrics=metrics, tags={"steward.state": state})
        self.logged_until = max([self.logged_until, *(r.get("time", 0) for r in records)])
        self._remember(run_dir)
        for file in LOGGED_FILES:
            if (run_dir / file).exists():
                self.client.log_artifact(self.run_id, str(run_dir / file))
        self.client.set_terminated(self.run_id, STATES.get(state, "FAILED"))

    def _children(self, children: Iterable[Child]) -> None:
        for child in children:
            tags = {"mlflow.parentRunId": self.run_id, **child.tags}
            run = self.client.create_run(self.experiment_id, run_name=child.name, tags=tags)
            curves = [(key, value, step, None) for key, curve in child.curves.items() for step, value in curve]
            self._batch(run.info.run_id, params=flatten(child.params), metrics=curves)
            self.client.set_terminated(run.info.run_id, STATES.get(child.state, "FAILED"))

    def _batch(
        self,
        run_id: str | None = None,
        params: dict[str, str] | None = None,
        metrics: Sequence[Point] = (),
        tags: dict[str, str] | None = None,
    ) -> None:
        """Log in MLflow's batches: parameters and tags 100 at a time, metrics 1,000."""
        from mlflow.entities import Metric, Param, RunTag

        run_id = run_id or self.run_id
        named: list[Any] = [Param(name(k), v[:PARAM_CHARS]) for k, v in (params or {}).items()]
        named += [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for chunk in _chunks(named, 100):
            params_, tags_ = [x for x in chunk if isinstance(x, Param)], [x for x in chunk if isinstance(x, RunTag)]
            self.client.log_batch(run_id, params=params_, tags=tags_)
        now = time.time()
        numbers = [Metric(name(k), float(v), int((at or now) * 1000), int(step)) for k, v, step, at in metrics]
        numbers = [m for m in numbers if math.isfinite(m.value)]
        for chunk in _chunks(numbers, BATCH):
            self.client.log_batch(run_id, metrics=chunk)


def warm_model_logging() -> None:
    """What logging a model at the run's end would otherwise wait for: importing mlflow.pyfunc, and the map of
    installed packages MLflow checks a model's requirements against (a scan of every installed distribution)."""
    import mlflow.pyfunc  # noqa: F401

    with contextlib.suppress(Exception):  # a private helper: a later MLflow without it only loses the head start
        from mlflow.utils.requirements_utils import _init_packages_to_modules_map

        _init_packages_to_modules_map()


def mlflow_client(uri: str) -> Any:
    """An MlflowClient for the tracking store and registry at `uri`, with steward's client settings."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient  # here: it takes a second to import, and light commands never track

    # the store's one-time table set-up says so at INFO on every new output_dir: not news for a steward user
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested dict as dotted keys and string values (lists and empty dicts as JSON)."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return flat


def history_metrics(records: Iterable[dict[str, Any]]) -> Iterator[Point]:
    """Every epoch's numbers and every step's loss in history records, at their optimizer step and time."""
    for record in records:
        numbers = {k: v for k, v in record.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if record.get("kind") == "epoch":
            yield from ((k, v, record["step"], record["time"]) for k, v in numbers.items() if k not in ("time", "step"))
        elif record.get("kind") == "step":
            yield "step_loss", record["loss"], record["step"], record["time"]


def result_metrics(result: dict[str, Any]) -> Iterator[tuple[str, float]]:
    """The test metrics of metrics.json: `test_<metric>` overall, `test.<column>.<group>.<metric>` per group."""
    for key, value in result.get("overall", {}).items():
        yield f"test_{key}", value
    for column, groups in result.get("groups", {}).items():
        for group, numbers in groups.items():
            yield from ((f"test.{column}.{group}.{key}", v) for key, v in numbers.items() if isinstance(v, int | float))


def name(key: str) -> str:
    """A parameter or metric name MLflow takes: other characters as `_`, at most 250 of them."""
    return NOT_A_NAME.sub("_", key)[:250]


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
