"""Run folders: `runs/<name>/<run-id>/` with the resolved spec first, a status file, and everything a run wrote."""

import hashlib
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from steward.spec import JobSpec

STATUS = "status.json"


def spec_hash(spec: JobSpec) -> str:
    """Content hash of the resolved spec, so every artifact can be traced to the exact spec that made it."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def create_run(spec: JobSpec) -> Path:
    """A fresh run folder holding the resolved spec and a `running` status."""
    run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    run_dir = (Path(spec.output_dir) / spec.name / run_id).resolve()
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
    set_status(run_dir, "running", spec_hash=spec_hash(spec))
    return run_dir


def set_status(run_dir: Path, state: str, **fields) -> None:
    """Record the run's state (running | succeeded | failed) atomically, keeping earlier fields."""
    path = run_dir / STATUS
    status = json.loads(path.read_text()) if path.exists() else {"started": time.time()}
    status.update(fields, state=state, updated=time.time())
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(status, indent=2))
    partial.replace(path)


def read_spec(run_dir: Path) -> JobSpec:
    """The resolved spec a run was made from."""
    return JobSpec.model_validate(yaml.safe_load((run_dir / "spec.yaml").read_text()))


@dataclass
class RunSummary:
    path: Path
    name: str
    state: str
    started: float
    headline: str


def list_runs(output_dir: Path) -> list[RunSummary]:
    """Every run folder under output_dir, newest first, with its state and headline metric."""
    runs = []
    for status_file in output_dir.glob(f"*/*/{STATUS}"):
        run_dir = status_file.parent
        status = json.loads(status_file.read_text())
        metrics_file = run_dir / "metrics.json"
        headline = ""
        if metrics_file.exists():
            metrics = json.loads(metrics_file.read_text())
            key = next(iter(metrics["overall"]))
            headline = f"{key}={metrics['overall'][key]:.4f}"
            if "fairness_gate" in metrics:  # set only when evaluate.fairness.thresholds are
                headline += f" fairness_gate={metrics['fairness_gate']}"
        runs.append(RunSummary(run_dir, run_dir.parent.name, status["state"], status.get("started", 0), headline))
    return sorted(runs, key=lambda r: r.started, reverse=True)
