"""Ray Jobs API: submit a packaged spec, and list / inspect / follow / stop jobs on any Ray cluster."""

import asyncio
import json
import os
import re
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from steward.errors import ClusterUnreachable, RunFailed, RunInterrupted, StewardError
from steward.govern.policy import Admission
from steward.ray_env import resource_problem
from steward.spec import JobSpec

if TYPE_CHECKING:
    from steward.cluster.package import Deps

Stage = Literal["train", "tune", "serve", "run"]
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TAIL_LINES = 20  # log lines shown with a failed job
QUIET_S = 10.0  # a log stream quiet this long: ask whether the job has ended (a status, not the log)
STOP_WAIT_S = 60.0  # Ray sends SIGKILL RAY_JOB_STOP_WAIT_TIME_S (3 s) after SIGTERM; this covers a busy head
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
        raise refused(url, path, err.code, err.read().decode(errors="replace")) from None
    except (urllib.error.URLError, OSError) as err:
        raise ClusterUnreachable(unreachable(url, getattr(err, "reason", err))) from None


def refused(url: str, path: str, code: int, detail: str) -> StewardError:
    """What an error answer from the Jobs API at `url` to `path` (JOB_ID/...) tells the user."""
    if code == 404 and path:
        return StewardError(f"no job {path.split('/')[0]!r} on {url}; `steward jobs list` shows them")
    lines = detail.strip().splitlines()
    answer = f"{code} {lines[-1] if lines else ''}".strip()
    fix = "; give it the cluster's token in $RAY_AUTH_TOKEN or ~/.ray/auth_token" if code in (401, 403) else ""
    return ClusterUnreachable(f"--address {url}: the Jobs API answered {answer}{fix}")


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


def stop_waiting(address: str | None, job_id: str, timeout_s: float = STOP_WAIT_S) -> Job:
    """Poll until the job has ended (a stopped job gets SIGTERM, then SIGKILL after Ray's grace period)."""
    deadline = time.monotonic() + timeout_s
    while not (info := job_info(address, job_id)).ended:
        if time.monotonic() > deadline:
            raise StewardError(
                f"job {job_id} is still {info.status} {timeout_s:.0f} s after it was asked to stop; "
                f"`steward jobs status {job_id}` shows when it has"
            )
        time.sleep(0.5)
    return info


def follow(address: str | None, job_id: str, write: Callable[[str], None]) -> Job:
    """Pass the job's log to `write` as the job writes it, until the job ends; returns the job's final details.

    The log so far, then each new chunk once, over one websocket to the Jobs API's log tail (what `ray job logs -f`
    reads): the cluster closes it once the job has ended and its log is read to the end. A job that has already
    ended gets its log in one request. Ctrl-C stops following (RunInterrupted) and leaves the job running.
    """
    try:
        info = job_info(address, job_id)  # an unknown job or no cluster: the message every jobs command gives
        if info.ended:
            write(logs(address, job_id))
            return info
        _in_background(lambda: _stream(address, job_id, write))
        info = job_info(address, job_id)
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"stopped following {job_id}; the job goes on (`steward jobs stop {job_id}` stops it)"
        ) from None
    if not info.ended:  # the stream closed under a running job: the head's dashboard or a proxy dropped it
        raise ClusterUnreachable(
            f"--address {jobs_address(address)}: the log stream of {job_id} closed while the job is {info.status}; "
            f"`steward jobs logs {job_id} --follow` starts again from the top"
        )
    return info


def _stream(address: str | None, job_id: str, write: Callable[[str], None]) -> None:
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(_tail(address, job_id, write))
    finally:
        loop.close()


def _in_background(call: Callable[[], object]) -> None:
    """`call` in a daemon thread while this one waits, so that Ctrl-C stops following at once: the stream's own
    code (a close handshake the Jobs API never answers, a blocking read) cannot hold the KeyboardInterrupt up, and
    the process exits without waiting for it."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread as it is
            failed.append(err)

    worker = threading.Thread(target=run, name="steward-follow", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if failed:
        raise failed[0]


async def _tail(address: str | None, job_id: str, write: Callable[[str], None]) -> None:
    """Write what the Jobs API's log tail sends until it closes (or stays quiet after the job has ended)."""
    import aiohttp  # only when following: Ray's own client for this stream (and steward bench's load generator)

    url = jobs_address(address)
    path = f"{job_id}/logs/tail"
    connect = aiohttp.ClientTimeout(total=None, connect=30, sock_connect=30)
    async with aiohttp.ClientSession(headers=ray_auth_header(), timeout=connect) as session:
        try:
            stream = await session.ws_connect(f"{url}/api/jobs/{path}")
        except aiohttp.WSServerHandshakeError as err:
            raise refused(url, path, err.status, err.message) from None
        except (aiohttp.ClientError, OSError) as err:
            raise ClusterUnreachable(unreachable(url, err)) from None
        async with stream:
            while True:
                try:
                    message = await stream.receive(timeout=QUIET_S)
                except TimeoutError:  # no pings: Ray's handler never reads, so it would never answer one
                    if job_info(address, job_id).ended:
                        return
                    continue
                if message.type is not aiohttp.WSMsgType.TEXT:
                    return  # closed, or dropped (receive turns a lost connection into CLOSED): follow() tells which
                write(message.data)


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
