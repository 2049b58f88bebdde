"""Driver side of serving: the fairness gate, deploy / status / stop on a Ray cluster, Serve config export.

Which run is served, and with which spec, is `steward.serve.source`; the replicas' part of the spec is
`steward.serve.replica.replica_config`.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema

from steward.errors import StewardError
from steward.govern import audit
from steward.monitor.actor import stop_monitors
from steward.ray_env import connect, is_local, worker_env
from steward.serve.app import build_app
from steward.serve.auth import load_keys
from steward.serve.model import contract_problem, model_source
from steward.serve.monitoring import MonitorUnavailable, reference_problem
from steward.serve.options import APP_BUILDER, DEPLOYMENT, app_name, deployment_options
from steward.serve.quantize import check_int8
from steward.serve.rollout import Challenger, RolloutTarget, replace_rollout, rollout_id, stop_rollout
from steward.serve.source import serving_spec
from steward.spec import JobSpec
from steward.spec.serve import ServeSpec


@dataclass(frozen=True)
class Deployed:
    name: str
    url: str
    run_dir: Path
    gate: dict | None


class FairnessGateFailed(StewardError):
    """The run failed its fairness gate and no override with a reason was given."""


def check_fairness_gate(job: JobSpec, run_dir: Path, override: str | None = None, action: str = "deploy") -> None:
    """Refuse a run whose metrics.json says `fairness_gate: failed`, unless `override` gives the reason.

    Both the refusal and the override go to the audit log, with who did it and why.
    """
    metrics = Path(run_dir) / "metrics.json"
    gate = json.loads(metrics.read_text()).get("fairness_gate") if metrics.exists() else None
    if gate != "failed":
        return
    fields = {**audit.run_fields(run_dir), "deployment": app_name(job), "action": action}
    log = audit.log_path(job.output_dir)
    if override is not None and override.strip():
        audit.record("fairness_gate.overridden", log=log, reason=override.strip(), **fields)
        return
    audit.record("deployment.refused", log=log, reason="fairness gate failed", **fields)
    raise FairnessGateFailed(
        f"{run_dir}: this run failed its fairness gate (metrics.json: fairness_gate: failed); deploying it needs "
        "--override-fairness-gate 'REASON' (the reason is recorded in the audit log), or mitigate and retrain"
    )


def deploy(
    spec: JobSpec,
    run_dir: Path,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    override_fairness_gate: str | None = None,
) -> Deployed:
    """Deploy the run's model as the spec's serve section says; returns once every replica is up.

    Everything a user can fix is refused before Ray starts: a run that failed its fairness gate (unless
    `override_fairness_gate` gives a reason), monitoring the run cannot provide, missing API keys, int8 that loses
    too much accuracy.
    """
    job = serving_spec(spec, run_dir)
    check_fairness_gate(job, run_dir, override_fairness_gate)
    if problem := reference_problem(job.monitor, run_dir):
        raise MonitorUnavailable(problem)
    if is_local(address):  # replicas of an embedded Ray see this environment: check keys up front
        load_keys(job.serve.auth if job.serve else None)
    gate = check_int8(job, run_dir)
    connect(address, job)
    serve.start(http_options={"host": host, "port": port})
    cfg = job.serve or ServeSpec()
    existed = app_name(job) in serve.status().applications
    serve.run(build_app(job, str(run_dir), gate), name=app_name(job), route_prefix=cfg.route_prefix)
    _record_deployment("deployment.updated" if existed else "deployment.created", job, run_dir, address)
    return Deployed(app_name(job), f"http://{host}:{port}{cfg.prefix}", run_dir, gate.to_dict() if gate else None)


def start_rollout(
    spec: JobSpec,
    champion: Path,
    challenger: Path,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    override_fairness_gate: str | None = None,
    policy: str | None = None,
) -> Deployed:
    """Deploy `champion` with `challenger` beside it as serve.rollout says, and start the rollout that moves traffic
    to it (`policy`: the policy file promotion is checked against). Refused before Ray starts: no rollout section,
    a challenger that is the champion or answers another contract, its failed fairness gate, monitoring either run
    cannot provide, a rollout of this deployment still running."""
    job, rival = serving_spec(spec, champion), serving_spec(spec, challenger)
    cfg = job.serve or ServeSpec()
    if cfg.rollout is None:
        raise StewardError("serve.rollout: a rollout needs this section (mode, steps, gates) in the spec; add it")
    if champion.resolve() == challenger.resolve():
        raise StewardError(f"--challenger {challenger} is the champion's run; pass another run")
    check_fairness_gate(rival, challenger, override_fairness_gate, action="rollout")
    for run in (champion, challenger):
        if problem := reference_problem(job.monitor, run):
            raise MonitorUnavailable(problem)
    if problem := contract_problem(champion, challenger):
        raise StewardError(f"--challenger {challenger}: {problem}; both arms must answer the same requests alike")
    if is_local(address):
        load_keys(cfg.auth)
    gates = check_int8(job, champion), check_int8(rival, challenger)
    connect(address, job)
    name = app_name(job)
    target = RolloutTarget(
        name,
        str(champion),
        str(challenger),
        cfg.rollout,
        job.output_dir,
        rollout_id(),
        policy,
        job.monitor.alerts.webhook if job.monitor else None,
    )
    rollout = replace_rollout(target)
    serve.start(http_options={"host": host, "port": port})
    arm = Challenger(model_source(rival, challenger, gates[1]), target)
    try:
        serve.run(build_app(job, str(champion), gates[0], arm), name=name, route_prefix=cfg.route_prefix)
    except Exception as err:  # a rollout whose replicas never came up must not block the next start
        ray.get(rollout.abort.remote(f"deploy failed: {type(err).__name__}: {err}", "steward"))
        raise
    _record_deployment("deployment.updated", job, champion, address)
    return Deployed(name, f"http://{host}:{port}{cfg.prefix}", champion, gates[0].to_dict() if gates[0] else None)


def _record_deployment(event: str, job: JobSpec, run_dir: Path, address: str | None) -> None:
    fields = audit.run_fields(run_dir) | {"deployment": app_name(job), "address": address or "local"}
    model_sha256 = audit.file_hash(Path(run_dir) / "model" / "model.safetensors")
    audit.record(event, log=audit.log_path(job.output_dir), **fields, model_sha256=model_sha256)


def status_rows(address: str | None = "auto") -> list[dict[str, Any]]:
    """One row per Serve application on the cluster: name, status, route, replicas per state."""
    connect(address)
    rows = []
    for name, app in serve.status().applications.items():
        replicas: dict[str, int] = {}
        for deployment in app.deployments.values():
            for state, count in deployment.replica_states.items():
                replicas[str(state)] = replicas.get(str(state), 0) + count
        rows.append({"name": name, "status": str(app.status), "replicas": replicas, "message": app.message})
    return rows


def stop(name: str, address: str | None = "auto", output_dir: str | Path = "runs") -> None:
    """Delete the Serve application `name` (StewardError when there is none); audited under `output_dir`."""
    connect(address)
    if name not in serve.status().applications:
        raise StewardError(f"no Serve application named {name!r}; `steward serve status` lists them")
    serve.delete(name)
    stop_monitors(name)
    stop_rollout(name)
    audit.record("deployment.stopped", log=audit.log_path(output_dir), deployment=name, address=address or "local")


def export_config(
    spec: JobSpec,
    run_dir: Path,
    path: Path,
    host: str = "0.0.0.0",
    port: int = 8000,
    override_fairness_gate: str | None = None,
) -> dict:
    """Write a Ray Serve config file (for `serve deploy`, or a KubeRay RayService's serveConfigV2) and return it.

    The file deploys the run elsewhere, so the fairness gate is checked here as for `deploy`.
    """
    job = serving_spec(spec, run_dir)
    check_fairness_gate(job, run_dir, override_fairness_gate, action="export")
    cfg = job.serve or ServeSpec()
    application = {
        "name": app_name(job),
        "route_prefix": cfg.route_prefix,
        "import_path": APP_BUILDER,
        "runtime_env": {"env_vars": worker_env(job)},
        "args": {"spec": job.model_dump(mode="json"), "run_dir": str(run_dir)},
        "deployments": [{"name": DEPLOYMENT, **deployment_options(cfg)}],
    }
    config = {"http_options": {"host": host, "port": port}, "applications": [application]}
    ServeDeploySchema.model_validate(config)  # refuse to write what `serve deploy` would reject
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config
