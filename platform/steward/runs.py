"""Run folders: `runs/<name>/<run-id>/` with the resolved spec first, a status file, and everything a run wrote.

With a URI output_dir (s3://, gs://) the run folder is staged locally and published to the URI (steward.storage
says how and when); `run_uri` names where a staged run goes. `resume_run` checks a run that `--resume` names
(downloading it to its staging folder when it is a URI).
"""

import hashlib
import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import ValidationError

from steward import storage
from steward.errors import StewardError
from steward.spec import JobSpec
from steward.spec.document import DocumentError, read_document

STATUS = storage.STATUS
# What a run needs to be continued: the checkpoint list Ray Train keeps (train/), the state Ray Tune keeps (tune/).
RESUMABLE = {"train": "train/checkpoint_manager_snapshot.json", "sweep": "tune/tuner.pkl"}


def spec_hash(spec: JobSpec) -> str:
    """Content hash of the resolved spec, so every artifact can be traced to the exact spec that made it."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def create_run(spec: JobSpec) -> Path:
    """A fresh run folder holding the resolved spec and a `running` status (staged and published for a URI)."""
    uri = storage.is_uri(spec.output_dir)
    if uri:
        storage.check_reachable(spec.output_dir, "output_dir")
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    root = storage.staging_dir(spec.output_dir) if uri else Path(spec.output_dir)
    run_dir = (root / spec.name / run_id).resolve()
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    set_status(run_dir, "running", spec_hash=spec_hash(spec))
    publish(spec, run_dir)
    return run_dir


def run_uri(spec: JobSpec, run_dir: Path) -> str | None:
    """Where a run staged in run_dir is published: <output_dir URI>/<name>/<run-id>; None for a folder output_dir."""
    return storage.join(spec.output_dir, spec.name, run_dir.name) if storage.is_uri(spec.output_dir) else None


def publish(spec: JobSpec, run_dir: Path) -> None:
    """Copy the staged run folder to its URI, status.json last (nothing to do for a folder output_dir)."""
    uri = run_uri(spec, run_dir)
    if uri is not None:
        storage.upload(run_dir, uri)


def resume_run(job: JobSpec, target: str, kind: str) -> tuple[JobSpec, Path]:
    """The run folder `--resume target` continues (a train or a sweep `kind` run) and the spec to continue it with.

    A URI (cluster storage) is downloaded to its staging folder, checkpoints left behind (Ray reads them from the
    URI), and the spec's output_dir becomes the storage holding the run, so what the run writes next is published
    there again. Raises StewardError naming --resume and the fix when the run cannot be continued.
    """
    uri = storage.is_uri(target)
    if uri:
        job = job.model_copy(update={"output_dir": _storage_of(target, job.name)})
    run_dir = _stage_for_resume(target) if uri else Path(target)
    if not (run_dir / "spec.yaml").exists():
        raise StewardError(f"--resume {target}: not a run folder (no spec.yaml); pass <output_dir>/<name>/<run-id>")
    sections = ("data", "model", "distributed", "tune") if kind == "sweep" else ("data", "model", "distributed")
    before = read_spec(run_dir)
    changed = [s for s in sections if getattr(before, s) != getattr(job, s)]
    if changed:
        raise StewardError(
            f"--resume {target}: the spec's {', '.join(changed)} differ from the run's; "
            "only train settings (e.g. train.epochs) may change when resuming"
        )
    marker = RESUMABLE[kind]
    found = storage.exists(storage.join(target, marker), "--resume") if uri else (run_dir / marker).exists()
    if kind == "train" and not found:  # Ctrl-C before Ray recorded one: the workers take the newest complete one
        train = storage.join(target, "train") if uri else str(run_dir.resolve() / "train")
        found = any(name.startswith("checkpoint_") for name in storage.folders(train, "--resume"))
    if not found:
        what, verb = ("no checkpoint", "train") if kind == "train" else ("no saved sweep state", "tune")
        raise StewardError(
            f"--resume {target}: {what} to continue from ({marker} is missing); start a new run "
            f"instead (`steward {verb} SPEC` without --resume)"
        )
    return job, run_dir.resolve()


def _storage_of(uri: str, name: str) -> str:
    """The output_dir URI holding the run at `uri` (<output_dir>/<name>/<run-id>), its query kept."""
    split = urlsplit(uri)
    parts = split.path.rstrip("/").split("/")
    if len(parts) < 2 or not parts[-1] or parts[-2] != name:
        raise StewardError(
            f"--resume {uri}: not a run of this spec's `{name}`; pass <output_dir>/{name}/<run-id> "
            "(`steward runs --storage URI` lists the runs there)"
        )
    return urlunsplit(split._replace(path="/".join(parts[:-2])))


def _stage_for_resume(uri: str) -> Path:
    """Download the run folder at `uri` (no checkpoints) to a fresh staging folder; StewardError if there is no run."""
    storage.check_reachable(uri, "--resume")
    if storage.read_text(storage.join(uri, STATUS), "--resume") is None:
        raise StewardError(f"--resume {uri}: no run there (no {STATUS}); `steward runs --storage URI` lists the runs")
    local = storage.staging_dir(uri)
    shutil.rmtree(local, ignore_errors=True)  # a stale copy must not mix with the run as stored now
    storage.download(uri, local)
    return local


def read_history(path: Path) -> list[dict]:
    """Every record of a history.jsonl file (empty when there is none yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def set_status(run_dir: Path, state: str, **fields) -> None:
    """Record the run's state (running | succeeded | failed) atomically, keeping earlier fields."""
    path = run_dir / STATUS
    status = json.loads(path.read_text()) if path.exists() else {"started": time.time()}
    status.update(fields, state=state, updated=time.time())
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(status, indent=2))
    partial.replace(path)


def read_spec(run_dir: Path) -> JobSpec:
    """The resolved spec a run was made from, read under a spec file's limits (a run folder may come from
    elsewhere: cluster storage, the model registry)."""
    path = Path(run_dir) / "spec.yaml"
    try:
        return JobSpec.model_validate(read_document(path)[0])
    except (DocumentError, ValidationError) as err:
        first = err.message if isinstance(err, DocumentError) else err.errors()[0]["msg"]
        reason = first if isinstance(err, DocumentError) else f"{err.error_count()} problem(s), first: {first}"
        raise StewardError(f"{path}: not a run's spec ({reason})") from None


@dataclass
class RunSummary:
    path: Path  # for a URI: the path inside its filesystem (bucket/...)
    name: str
    state: str
    started: float
    headline: str


def list_runs(output_dir: Path | str) -> list[RunSummary]:
    """Every run folder under output_dir (a folder, or a URI such as s3://bucket/runs), newest first."""
    if storage.is_uri(output_dir):
        return _list_uri(str(output_dir))
    runs = []
    for status_file in Path(output_dir).glob(f"*/*/{STATUS}"):
        metrics_file = status_file.parent / "metrics.json"
        metrics = metrics_file.read_text() if metrics_file.exists() else None
        runs.append(_summary(status_file.parent, status_file.read_text(), metrics))
    return sorted(runs, key=lambda r: r.started, reverse=True)


def _list_uri(uri: str) -> list[RunSummary]:
    """Run folders in cluster storage Ray can write to (s3://, gs://, file://), read through pyarrow's filesystems."""
    import pyarrow.fs as pafs

    storage.check_reachable(uri, "--storage")
    fs, root = storage.open_uri(uri, "--storage")

    def folders(path: str) -> list[str]:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return [i.path for i in infos if i.type == pafs.FileType.Directory]

    def read(path: str) -> str | None:
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as stream:
            return stream.read().decode()

    runs = []
    for run in (run for name in folders(root) for run in folders(name)):
        status = read(f"{run}/{STATUS}")
        if status is not None:
            runs.append(_summary(Path(run), status, read(f"{run}/metrics.json")))
    return sorted(runs, key=lambda r: r.started, reverse=True)


def _summary(run_dir: Path, status_text: str, metrics_text: str | None) -> RunSummary:
    status = json.loads(status_text)
    headline = ""
    if metrics_text:
        metrics = json.loads(metrics_text)
        key = next(iter(metrics["overall"]))
        headline = f"{key}={metrics['overall'][key]:.4f}"
        if "fairness_gate" in metrics:  # set only when evaluate.fairness.thresholds are
            headline += f" fairness_gate={metrics['fairness_gate']}"
    return RunSummary(run_dir, run_dir.parent.name, status["state"], status.get("started", 0), headline)
