"""What a cluster job needs, as a Ray runtime_env: the spec, the local files it reads, the project, its requirements.

The spec is rewritten so every local input points inside the job's working_dir (the cluster cannot see this
machine's paths); the project travels as a py_module (no wheel build); requirements pin the versions installed here,
so the cluster runs what was validated here.
"""

import importlib.metadata
import re
import shutil
import site
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

import steward
from steward.errors import StewardError
from steward.spec import JobSpec
from steward.storage import is_uri, open_uri

Deps = Literal["pip", "preinstalled"]
INPUTS = "inputs"  # the working_dir folder that local inputs are copied into
EXCLUDES = ["__pycache__", "*.pyc", ".git", ".venv", "runs", ".mypy_cache", ".ruff_cache", ".pytest_cache"]
# Ray refuses a runtime_env package at or above its gRPC message size (ray._private.runtime_env.packaging).
try:
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE as PACKAGE_LIMIT
except ImportError:  # pragma: no cover - a Ray that moved it; 512 MiB is its documented limit
    PACKAGE_LIMIT = 512 * 1024 * 1024
# Ray ships on the cluster (its version must match the head's); pip must not replace it inside a job.
NOT_PINNED = {"ray"}


@dataclass
class Package:
    """A staged job: its working_dir (spec.yaml + inputs/) and the runtime_env that carries it."""

    workdir: Path
    runtime_env: dict[str, Any]
    size_bytes: int
    inputs: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def package_job(spec: JobSpec, deps: Deps = "pip", env_vars: dict[str, str] | None = None) -> Package:
    """Stage `spec` (already validated) for the cluster; StewardError when it cannot run there or is too large."""
    check_output_dir(spec)
    workdir = Path(tempfile.mkdtemp(prefix="steward-job-"))
    try:
        remote, inputs = _stage_inputs(spec, workdir / INPUTS)
        (workdir / "spec.yaml").write_text(yaml.safe_dump(remote, sort_keys=False))
        project = Path(steward.__file__).resolve().parent
        size = check_size(workdir, project)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "py_modules": [str(project)],
        "excludes": EXCLUDES,
        "env_vars": {"PYTHONUNBUFFERED": "1", **(env_vars or {})},
    }
    if deps == "pip":
        runtime_env["pip"] = {"packages": requirements(), "pip_check": False}
    return Package(workdir, runtime_env, size, inputs)


def check_output_dir(spec: JobSpec) -> None:
    """A cluster job's run folder must outlive the job: a URI (s3://, gs://) or a shared folder, not the job's
    temporary working_dir. A URI is opened here, so a scheme pyarrow lacks is refused before anything uploads."""
    out = spec.output_dir
    if is_uri(out):
        open_uri(out, "output_dir")
        return
    if not Path(out).is_absolute():
        raise StewardError(
            f"output_dir {out!r} is relative: on the cluster it would land in the job's temporary working_dir and "
            "vanish with it; pass --storage /shared/runs (a folder every node mounts) or --storage s3://bucket/runs"
        )


def _stage_inputs(spec: JobSpec, inputs: Path) -> tuple[dict, list[str]]:
    """The spec as the cluster must read it, with local inputs copied under `inputs` and pointed at relatively."""
    remote = spec.model_dump(mode="json")
    copied: list[str] = []

    def bring(path: str) -> str:
        source = Path(path)
        target = inputs / f"{len(copied)}-{source.name}"
        inputs.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        copied.append(str(source))
        return str(target.relative_to(inputs.parent))

    if spec.data.scheme == "file":
        remote["data"]["source"] = "file:" + bring(spec.data.location)
    pretrained = remote["model"]["params"].get("pretrained")
    if pretrained and Path(pretrained).is_absolute():
        remote["model"]["params"]["pretrained"] = _installed(pretrained) or bring(pretrained)
    auth = (remote.get("serve") or {}).get("auth") or {}
    if auth.get("api_keys_file"):
        auth["api_keys_file"] = bring(auth["api_keys_file"])
    return remote, copied


def _installed(path: str) -> str | None:
    """`pkg:<module>/<sub>` for a folder inside an installed package (the cluster installs it; no upload)."""
    for root in [*site.getsitepackages(), site.getusersitepackages()]:
        if Path(path).is_relative_to(root):
            return "pkg:" + Path(path).relative_to(root).as_posix()
    return None


def check_size(*folders: Path) -> int:
    """Zip the folders as Ray will and return the bytes; StewardError naming the largest files above Ray's limit."""
    files = [f for folder in folders for f in folder.rglob("*") if f.is_file() and not _excluded(f, folder)]
    with tempfile.TemporaryFile() as raw:
        with zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as archive:
            for f in files:
                archive.write(f, f.as_posix())
        size = raw.tell()
    if size >= PACKAGE_LIMIT:
        largest = sorted(files, key=lambda f: f.stat().st_size, reverse=True)[:3]
        shown = ", ".join(f"{f.name} ({f.stat().st_size / 2**20:.0f} MiB)" for f in largest)
        raise StewardError(
            f"the job package is {size / 2**20:.0f} MiB, above Ray's runtime_env limit of "
            f"{PACKAGE_LIMIT / 2**20:.0f} MiB; largest files: {shown}. Put large data and models on shared storage "
            "or a bucket the cluster reads (hf:, an absolute shared path) instead of shipping them with the job"
        )
    return size


def _excluded(path: Path, root: Path) -> bool:
    parts = path.relative_to(root).parts
    return any(p in EXCLUDES for p in parts) or path.suffix == ".pyc"


def requirements() -> list[str]:
    """steward's dependencies pinned to the versions installed here (ray excluded: the cluster's own must match)."""
    pins = []
    for requirement in importlib.metadata.requires("steward") or []:
        if "extra ==" in requirement:
            continue
        name = re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0]
        if name.lower() in NOT_PINNED:
            continue
        try:
            # A local label (torch's +cpu) names a wheel of this machine's index; the cluster's index picks its own.
            pins.append(f"{name}=={importlib.metadata.version(name).split('+')[0]}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(requirement.split(";")[0].strip())
    return pins
