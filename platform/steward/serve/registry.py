"""The model registry, on MLflow's: a version per succeeded train or tune run, promoted by alias.

A run that succeeds with tracking on registers its model under the spec's name: the servable run folder logged as
an MLflow pyfunc model (steward.serve.pyfunc), the model card as the version's description, and each gate's result
as a tag (fairness, from metrics.json; int8, checked here when the spec serves int8; policy, which admitted the run).
Aliases, not MLflow's deprecated stages: a version whose gates passed becomes `challenger`; `champion` only by
`steward models promote`, which re-checks the gates and the policy in force and writes the audit log. A version
that failed a gate is registered all the same (its failure is the record) and can never be promoted.

`fetch` brings a version's run folder back (`steward serve SPEC --model models:/NAME@champion`) and writes
registry.json into it, which the endpoint's GET /info shows. Only the folder's own files are read (weights as
safetensors, JSON, YAML): never the pickled Python model MLflow keeps beside them.
"""

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steward.errors import StewardError
from steward.govern import audit
from steward.govern.policy import admit
from steward.runs import read_spec
from steward.serve.model import REGISTERED
from steward.spec import JobSpec
from steward.spec.tracking import ALIAS, MODEL_URI, NAME
from steward.storage import is_uri
from steward.tracking import STORE, Tracker, mlflow_client, tracking_uri

CHALLENGER, CHAMPION = "challenger", "champion"
GATES = ("fairness", "int8", "policy")
GATE = "steward.gate."  # a version's tag per gate: passed, failed, or not_used
ARCHIVED = "steward.archived"
DESCRIPTION_CHARS = 5000  # of the card's markdown, as the version's description


class RegistryError(StewardError):
    """A model URI, name, version or alias the registry does not hold, or a promotion it refuses."""


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str
    created: int  # ms since the epoch

    @property
    def gates(self) -> dict[str, str]:
        return {gate: self.tags.get(GATE + gate, "not_used") for gate in GATES}

    @property
    def failed(self) -> list[str]:
        return [gate for gate, result in self.gates.items() if result == "failed"]

    @property
    def archived(self) -> bool:
        return self.tags.get(ARCHIVED) == "true"

    def __str__(self) -> str:
        state = ", ".join(self.aliases) or ("archived" if self.archived else f"failed: {', '.join(self.failed)}")
        return f"models:/{self.name}/{self.version} ({state})"


def register(tracker: Tracker, job: JobSpec, run_dir: Path) -> Version | None:
    """Register the run's model as a new version of `job.name` (alias challenger when its gates passed), and write
    registry.json into the run folder. None when tracking is off or MLflow refused (one warning, the run goes on)."""
    if not (job.tracking.registry and tracker.on):
        return None
    registered: list[Version] = []
    tracker.guard(lambda: registered.append(_register(tracker, job, run_dir)))
    return registered[0] if registered else None


def register_run(run_dir: Path) -> Version:
    """Register a succeeded run that is not registered yet: trained with tracking off, or cut short between its
    success and its registration. Its MLflow run is the one it was tracked in, if any."""
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    if status.get("state") != "succeeded" or not (run_dir / "model" / "model.json").exists():
        raise RegistryError(f"{run_dir}: not a succeeded run folder with a model; pass runs/<name>/<run-id>")
    if (run_dir / REGISTERED).exists():
        raise RegistryError(f"{run_dir}: already registered ({REGISTERED} says which version)")
    job = read_spec(run_dir)
    job = job.model_copy(update={"tracking": job.tracking.model_copy(update={"enabled": True, "registry": True})})
    problems: list[str] = []
    tracker = Tracker.start(job, run_dir, "sweep" if status.get("best_trial") else "train", problems.append)
    version = register(tracker, job, run_dir)
    tracker.finish(run_dir, "succeeded")
    if version is None:
        raise RegistryError(f"{run_dir}: not registered: {'; '.join(problems) or 'no MLflow store for its output_dir'}")
    return version


def _register(tracker: Tracker, job: JobSpec, run_dir: Path) -> Version:
    from steward.serve.pyfunc import save_pyfunc  # mlflow.pyfunc: imported by the runs that register, only

    client = tracker.client
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifacts(tracker.run_id, str(save_pyfunc(run_dir, Path(scratch))), "model")
    if not client.search_registered_models(f"name = '{job.name}'"):
        client.create_registered_model(job.name, tags={"steward.spec_name": job.name})
    gates = gate_results(job, run_dir)
    tags = {GATE + gate: result for gate, result in gates.items()} | {
        "steward.run_folder": str(run_dir),
        "steward.run_id": run_dir.name,
    }
    card = run_dir / "model_card.md"
    created = client.create_model_version(
        job.name,
        source=f"{client.get_run(tracker.run_id).info.artifact_uri}/model",
        run_id=tracker.run_id,
        tags=tags,
        description=card.read_text()[:DESCRIPTION_CHARS] if card.exists() else None,
    )
    if "failed" not in gates.values():
        client.set_registered_model_alias(job.name, CHALLENGER, created.version)
    version = _version(client.get_model_version(job.name, created.version))
    (run_dir / REGISTERED).write_text(json.dumps(as_info(version, tracker.uri)))
    return version


def gate_results(job: JobSpec, run_dir: Path) -> dict[str, str]:
    """Each gate's result for the run: the fairness gate of metrics.json, the int8 gate when the spec serves int8,
    and the policy, which admitted the run before it started."""
    from steward.serve.quantize import QuantizationRefused, check_int8

    metrics = json.loads((run_dir / "metrics.json").read_text())
    results = {"fairness": metrics.get("fairness_gate") or "not_used", "int8": "not_used", "policy": "passed"}
    if job.serve is not None and job.serve.quantize == "int8":
        try:
            check_int8(job, run_dir)
            results["int8"] = "passed"
        except QuantizationRefused:
            results["int8"] = "failed"
    return results


def as_info(version: Version, uri: str) -> dict[str, Any]:
    """What registry.json (and so GET /info) says of a version."""
    return {
        "name": version.name,
        "version": version.version,
        "aliases": list(version.aliases),
        "gates": version.gates,
        "run_id": version.run_id,  # the MLflow run that logged it
        "tracking_uri": uri,
    }


def open_registry(uri: str) -> Any:
    """An MlflowClient for the registry at `uri`; a local SQLite store that does not exist is refused rather than
    created empty."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        raise RegistryError(
            f"no model registry at {uri}: train with tracking on first, or pass --tracking-uri (or set "
            "$MLFLOW_TRACKING_URI) to the registry's MLflow server"
        )
    return mlflow_client(uri)


def default_uri(output_dir: str | Path) -> str:
    """$MLFLOW_TRACKING_URI, else the embedded store of `output_dir`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(Path(output_dir) / STORE).resolve()}"


def versions(client: Any, name: str | None = None) -> list[Version]:
    """Every version of `name` (or of every registered model), newest first."""
    query = f"name = '{check_name(name)}'" if name else None
    # a search's versions carry no aliases: each is read whole
    found = [get(client, v.name, str(v.version)) for v in client.search_model_versions(query, max_results=10_000)]
    return sorted(found, key=lambda v: (v.name, -int(v.version)))


def get(client: Any, name: str, ref: str) -> Version:
    """A version of `name` by number or by alias (`@champion` or `champion`)."""
    from mlflow.exceptions import MlflowException

    check_name(name)
    try:
        if ref.isdigit():
            return _version(client.get_model_version(name, ref))
        return _version(client.get_model_version_by_alias(name, ref.removeprefix("@")))
    except MlflowException as err:
        raise RegistryError(f"{name} {ref}: not in the registry ({_reason(err)}); see `steward models list`") from None


def promote(client: Any, name: str, ref: str, alias: str, policy: str | Path | None, log: Path) -> Version:
    """Point `alias` at the version: refused (exit 2, audited) when it failed a gate, is archived, or its spec is
    refused by the policy in force."""
    version = get(client, name, ref)
    fields = {"model": name, "version": version.version, "alias": alias}
    problem = None
    if version.failed:
        gates = ", ".join(f"{g} gate {version.gates[g]}" for g in version.failed)
        problem = f"version {version.version} of {name} failed its gates ({gates}); it can never become {alias}"
    elif version.archived:
        problem = f"version {version.version} of {name} is archived; register a new version instead"
    if problem:
        audit.record("model.promotion_refused", log=log, reason=problem, **fields)
        raise RegistryError(problem)
    with tempfile.TemporaryDirectory() as scratch:
        admit(read_spec(_download(client, version, Path(scratch))), policy, "promote", f"models:/{name}/{ref}")
    client.set_registered_model_alias(name, alias, version.version)
    audit.record("model.promoted", log=log, run_id=version.tags.get("steward.run_id"), **fields)
    return get(client, name, version.version)


def archive(client: Any, name: str, ref: str, log: Path) -> Version:
    """Take every alias off the version and mark it archived (audited); it stays in the registry as a record."""
    version = get(client, name, ref)
    for alias in version.aliases:
        client.delete_registered_model_alias(name, alias)
    client.set_model_version_tag(name, version.version, ARCHIVED, "true")
    audit.record("model.archived", log=log, model=name, version=version.version, aliases=list(version.aliases))
    return get(client, name, version.version)


def served_version(job: JobSpec, model_uri: str) -> Path:
    """The registered version `model_uri` names, from the spec's registry, fetched into output_dir/registry (a
    cluster's runs volume, where every replica finds it)."""
    uri = tracking_uri(job)
    if uri is None or is_uri(job.output_dir):
        raise RegistryError(
            f"--model {model_uri}: set tracking.uri (or $MLFLOW_TRACKING_URI) to the registry's MLflow server, and "
            "a local or mounted output_dir to fetch the version into"
        )
    return fetch(model_uri, uri, Path(job.output_dir) / "registry")


def fetch(model_uri: str, registry_uri: str, into: Path) -> Path:
    """The run folder of the version `model_uri` names (models:/NAME@ALIAS or models:/NAME/VERSION), downloaded
    to `into`/NAME/VERSION with registry.json beside its files."""
    match = MODEL_URI.match(model_uri)
    if match is None:
        raise RegistryError(
            f"--model {model_uri!r}: expected models:/NAME@ALIAS (e.g. models:/quickstart@champion) or models:/NAME/3"
        )
    client = open_registry(registry_uri)
    version = get(client, match["name"], match["version"] or match["alias"])
    if version.archived:
        raise RegistryError(f"--model {model_uri}: version {version.version} is archived; promote another version")
    target = into / version.name / version.version
    if (target / "model" / "model.json").exists() and _same_version(target, version, registry_uri):
        # fetched before: keep the folder, and the monitor's state the last deployment saved in it
        (target / REGISTERED).write_text(json.dumps(as_info(version, registry_uri)))
        return target
    with tempfile.TemporaryDirectory(dir=_made(into)) as scratch:
        folder = _download(client, version, Path(scratch))
        if not (folder / "model" / "model.json").exists():
            raise RegistryError(f"--model {model_uri}: version {version.version} holds no steward model")
        read_spec(folder)  # under a spec file's limits, before anything else reads it
        (folder / REGISTERED).write_text(json.dumps(as_info(version, registry_uri)))
        shutil.rmtree(target, ignore_errors=True)
        _made(target.parent)
        shutil.move(str(folder), target)
    return target


def _same_version(folder: Path, version: Version, uri: str) -> bool:
    try:
        before = json.loads((folder / REGISTERED).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(before, dict) and before.get("tracking_uri") == uri and before.get("run_id") == version.run_id


def _download(client: Any, version: Version, scratch: Path) -> Path:
    """The version's run folder (the pyfunc model's `run` artifact) downloaded under `scratch`."""
    from mlflow.artifacts import download_artifacts

    from steward.serve.pyfunc import RUN_ARTIFACT

    source = client.get_model_version_download_uri(version.name, version.version)
    # the store's own URI, not the process's: a server's artifacts (mlflow-artifacts:/) are fetched through it
    uri = client.tracking_uri
    model = Path(download_artifacts(f"{source}/artifacts", dst_path=str(scratch), tracking_uri=uri, registry_uri=uri))
    if not (model / RUN_ARTIFACT).is_dir():
        raise RegistryError(f"models:/{version.name}/{version.version}: not a steward model (no run artifact)")
    return model / RUN_ARTIFACT


def check_alias(alias: str) -> str:
    if not re.fullmatch(ALIAS, alias) or alias.lower() == "latest":
        raise RegistryError(f"--alias {alias!r}: letters, digits, _ and - (at most 64), not 'latest' (MLflow's own)")
    return alias


def check_name(name: str) -> str:
    if not re.fullmatch(NAME, name):
        raise RegistryError(f"model name {name!r}: a spec's name (letters, digits, _ . -, at most 64)")
    return name


def _version(found: Any) -> Version:
    return Version(
        found.name,
        str(found.version),
        tuple(found.aliases or ()),
        dict(found.tags or {}),
        found.run_id or "",
        int(found.creation_timestamp or 0),
    )


def _made(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _reason(err: Exception) -> str:
    return " ".join(str(err).split())[:200]
