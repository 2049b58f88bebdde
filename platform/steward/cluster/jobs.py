"""Ray Jobs API: submit a packaged spec, and list / inspect / follow / stop jobs on any Ray cluster."""

import json
import os
import re
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from steward.errors import ClusterUnreachable, RunFailed, StewardError
from steward.govern.policy import Admission
from steward.ray_env import resource_problem
from steward.spec import JobSpec

if TYPE_CHECKING:
    from steward.cluster.package import Deps

Stage = Literal["train", "tune", "serve", "run"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TAIL_LINES = 20  # log lines shown with a failed job
# Ray's own internals in a job's log (a dying raylet floods it with its state dump and event lines).
RAY_NOISE = re.compile(r"^(\[state-dump\]|\[\d{4}-\d\d-\d\d [\d:,]+ \w \d+ \d+\] \((raylet|gcs_server)\))")
STEWARD_ERRORS = (
    "error: ",
    "training failed: ",
    "sweep failed: ",
    "deploy failed: ",
    "bug: ",
    "interrupted: ",
)  # what steward.cli.common prints


class JobFailed(RunFailed):
    """A cluster job ended FAILED or STOPPED; the message holds Ray's reason and the job's last log lines."""

    what = None


@dataclass(frozen=True)
class Submitted:
    job_id: str
    address: str
    dashboard_url: str
    package_bytes: int


def jobs_address(address: str | None) -> str:
    """The Jobs API address: --address, else RAY_API_SERVER_ADDRESS / an http RAY_ADDRESS, else the local default."""
    if address:
        return address if "://" in address else f"http://{address}"
    env = os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def client(address: str | None) -> Any:
    """Ray's JobSubmissionClient for the cluster at `address` (submitting uploads a package: Ray's own client does
    that); ClusterUnreachable saying what to do when nothing answers."""
    from ray.job_submission import JobSubmissionClient

    url = jobs_address(address)
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ClusterUnreachable(unreachable(url, reason)) from None


def unreachable(url: str, reason: object) -> str:
    return (
        f"--address {url}: cannot reach a Ray Jobs API there ({reason}); check the head's dashboard address "
        "(http://HEAD:8265) and that the cluster is up (cluster/local-up.sh, `ray start --head`)"
    )


def entrypoint(stage: Stage, port: int = 8000) -> str:
    """The command the job runs on the head node: the same CLI call as on a laptop, joined to the cluster."""
    if stage == "serve":
        return f"python -m steward serve deploy spec.yaml --address auto --host 0.0.0.0 --port {port}"
    extra = f" --port {port}" if stage == "run" else ""
    return f"python -m steward {stage} spec.yaml --address auto{extra}"


def check_stage(spec: JobSpec, stage: Stage) -> None:
    """Refuse a stage the spec has no section for, before anything is uploaded."""
    if stage == "tune" and spec.tune is None:
        raise StewardError("--stage tune: the spec has no `tune` section; add one or submit --stage train")
    if stage == "serve" and spec.serve is None:
        raise StewardError("--stage serve: the spec has no `serve` section; add one (e.g. serve: {route_prefix: /x})")


def check_cluster_resources(spec: JobSpec, address: str, stage: Stage) -> None:
    """Compare what the spec's workers ask for with the cluster's alive nodes, before submitting (StewardError)."""
    if stage == "serve":
        return
    from ray.util.state import list_nodes

    have: dict[str, float] = {}
    for node in list_nodes(address=address, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False):
        for kind, amount in (node.resources_total or {}).items():
            have[kind] = have.get(kind, 0.0) + amount
    problem = resource_problem(spec, have)
    if problem:
        raise StewardError(f"{problem} (cluster at {address})")


def submit(
    spec: JobSpec,
    stage: Stage,
    address: str | None,
    deps: "Deps" = "pip",
    port: int = 8000,
    admission: Admission | None = None,
) -> Submitted:
    """Package and submit `spec` (validated) as a Ray job running `stage`; returns once the cluster accepted it.

    The policy in force admits the spec here first (the CLI names its --policy), before the cluster is contacted.
    """
    from steward.cluster.package import package_job  # Ray's packaging: only when a job is submitted

    (admission or Admission("submit", spec.name)).admit(spec)
    check_stage(spec, stage)
    jobs = client(address)
    url = jobs_address(address)
    check_cluster_resources(spec, url, stage)
    package = package_job(spec, deps)
    try:
        job_id = jobs.submit_job(
            entrypoint=entrypoint(stage, port),
            submission_id=f"steward-{re.sub(r'[^a-z0-9-]', '-', spec.name.lower())}-{stage}-{secrets.token_hex(3)}",
            runtime_env=package.runtime_env,
            metadata={"steward_job": spec.name, "steward_stage": stage},
        )
    finally:  # Ray has uploaded the package by now (or failed to)
        package.cleanup()
    return Submitted(job_id, url, f"{url}/#/jobs/{job_id}", package.size_bytes)


@dataclass(frozen=True)
class Job:
    """A job as the Jobs API describes it: the fields steward reads."""

    status: str
    entrypoint: str = ""
    submission_id: str | None = None
    job_id: str | None = None
    message: str | None = None
    metadata: dict | None = None
    start_time: int | None = None

    @property
    def ended(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")

    @classmethod
    def from_json(cls, data: dict) -> "Job":
        fields = {name: data.get(name) for name in cls.__dataclass_fields__}
        return cls(**fields)  # type: ignore[arg-type]  # the Jobs API's JSON: status is always there


def _call(address: str | None, method: str, path: str) -> Any:
    """One request to the Jobs API over plain HTTP (Ray's own client would load all of Ray for a status line).

    ClusterUnreachable when nothing answers; StewardError naming the job when it does not exist.
    """
    url = jobs_address(address)
    request = urllib.request.Request(f"{url}/api/jobs/{path}", method=method, headers=ray_auth_header())
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        if err.code == 404 and path:
            job = path.split("/")[0]
            raise StewardError(f"no job {job!r} on {url}; `steward jobs list` shows them") from None
        detail = err.read().decode(errors="replace").strip().splitlines()
        answer = f"{err.code} {detail[-1] if detail else ''}".strip()
        raise ClusterUnreachable(f"--address {url}: the Jobs API answered {answer}") from None
    except (urllib.error.URLError, OSError) as err:
        raise ClusterUnreachable(unreachable(url, getattr(err, "reason", err))) from None


def ray_auth_header() -> dict[str, str]:
    """The bearer token Ray's own clients send when the cluster uses token authentication (on by default for
    clusters Ray starts): $RAY_AUTH_TOKEN, else the file $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_info(address: str | None, job_id: str) -> Job:
    """The job's details; StewardError when the cluster has no such job."""
    return Job.from_json(_call(address, "GET", job_id))


def list_jobs(address: str | None) -> list[Job]:
    """Every job the cluster knows, newest first (submitted by steward or not)."""
    return sorted(map(Job.from_json, _call(address, "GET", "")), key=lambda j: j.start_time or 0, reverse=True)


def logs(address: str | None, job_id: str) -> str:
    """The job's whole log (its entrypoint's stdout and stderr) so far."""
    return _call(address, "GET", f"{job_id}/logs")["logs"]


def stop(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    return bool(_call(address, "POST", f"{job_id}/stop")["stopped"])


def follow(address: str | None, job_id: str, write: Callable[[str], None], every_s: float = 1.0) -> Job:
    """Stream the job's log through `write` until the job ends; returns its final details."""
    shown = 0
    while True:
        info = job_info(address, job_id)
        text = logs(address, job_id)
        if len(text) > shown:
            write(text[shown:])
            shown = len(text)
        if info.ended:
            return info
        time.sleep(every_s)  # the Jobs API has no push for plain HTTP clients; a second is what `ray job logs -f` uses


def failure(info: Job, log_text: str) -> JobFailed:
    """A JobFailed carrying the reason (steward's own error line when the job printed one, else Ray's) and the last
    lines of the job's log, without Ray's internal lines (RAY_NOISE)."""
    lines = [line for line in log_text.rstrip().splitlines() if line.strip() and not RAY_NOISE.match(line)]
    shown = "\n".join(f"  | {line}" for line in lines[-TAIL_LINES:]) or "  | (no output)"
    reason = ray_reason(info) or str(info.status)
    ours = next((line for line in reversed(lines) if line.startswith(STEWARD_ERRORS)), None)
    headline = f"{ours} ({reason})" if ours else reason
    return JobFailed(f"job {info.submission_id or info.job_id} {info.status}: {headline}\nlast log lines:\n{shown}")


def ray_reason(info: Job) -> str:
    """Ray's reason for the job's state, without the copy of the log's tail Ray appends to it (shown apart)."""
    return (info.message or "").split(", last available logs")[0].strip()


def raise_if_failed(address: str | None, info: Job) -> None:
    """Raise JobFailed (with the log's tail) unless the job succeeded or is still going."""
    if info.status in ("FAILED", "STOPPED"):
        raise failure(info, logs(address, info.submission_id or info.job_id or ""))
