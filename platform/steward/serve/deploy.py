"""Driver side of serving: which run, the int8 check, deploy / status / stop on a Ray cluster, config export."""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steward.govern import audit
from steward.runs import list_runs, read_spec
from steward.serve.auth import load_keys
from steward.serve.monitoring import reference_problem
from steward.spec import JobSpec
from steward.spec.serve import ServeSpec
from steward.storage import fetch_run, is_uri, join

APP_BUILDER = "steward.serve.app:app_builder"
# Ray's high-throughput Serve mode: HAProxy as the ingress and requests sent straight to replicas. Measured here it
# takes Serve's overhead over bare FastAPI from ~8 ms to ~0.3 ms per request (benchmarks/serve_overhead.py).
HIGH_THROUGHPUT = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@dataclass(frozen=True)
class Deployed:
    name: str
    url: str
    run_dir: Path
    gate: dict | None


def prefer_high_throughput(cfg: ServeSpec | None) -> bool:
    """Turn on Ray's high-throughput Serve mode for `cfg` when haproxy is installed and the user has not chosen.

    Only for a fixed number of replicas: under Ray 2.60's HAProxy ingress the autoscaler did not add replicas under
    load in our tests (tests/test_serve_autoscale.py runs Serve's default proxy, which does). Serve reads these
    variables when its processes start, so call this before an embedded Ray starts; a cluster joined with
    --address keeps its own setting. Returns whether the mode is on for Rays started from now on.
    """
    wanted = cfg is not None and cfg.autoscaling is None
    if wanted and "RAY_SERVE_ENABLE_HA_PROXY" not in os.environ and shutil.which("haproxy"):
        os.environ.update(HIGH_THROUGHPUT)
    return os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


def find_run(spec: JobSpec, run: Path | None = None) -> Path:
    """`run` when given (checked), else the newest succeeded run of this spec's name under its output_dir.

    With a URI output_dir (cluster storage) the newest succeeded run there is downloaded to its local staging
    folder first (steward.storage.fetch_run).
    """
    if spec.serve is None:
        raise ValueError("serve: the spec has no serve section; add one (e.g. `serve: {route_prefix: /digits}`)")
    if run is not None:
        if not (Path(run) / "model" / "model.json").exists():
            raise ValueError(f"--run {run}: not a finished run folder (no model/model.json); pass runs/<name>/<id>")
        return Path(run).resolve()
    uri = is_uri(spec.output_dir)
    for summary in list_runs(spec.output_dir if uri else Path(spec.output_dir)):
        if summary.name != spec.name or summary.state != "succeeded":
            continue
        if uri:
            return fetch_run(join(spec.output_dir, spec.name, summary.path.name), "output_dir")
        if (summary.path / "model").is_dir():
            return summary.path.resolve()
    raise ValueError(
        f"no succeeded run of {spec.name!r} under {spec.output_dir}/; train it first (steward run SPEC) or pass --run"
    )


class FairnessGateFailed(ValueError):
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


def serving_spec(spec: JobSpec, run_dir: Path) -> JobSpec:
    """The run's own spec (data and model as trained) with the serve and monitor sections of `spec`.

    The explain section (POST /explain's settings and caps) is `spec`'s when it has one, else the run's.
    """
    if spec.serve is None:
        raise ValueError("serve: the spec has no serve section; add one (e.g. `serve: {route_prefix: /digits}`)")
    run_spec = read_spec(run_dir)
    explain = spec.explain or run_spec.explain
    return run_spec.model_copy(update={"serve": spec.serve, "monitor": spec.monitor, "explain": explain})


def check_int8(job: JobSpec, run_dir: Path) -> dict | None:
    """Run the int8 accuracy gate before deploying (QuantizationRefused, a ValueError, when it fails)."""
    if job.serve is None or job.serve.quantize != "int8":
        return None
    from steward.serve.model import load_served_model

    gate = load_served_model(job, run_dir).gate
    return gate.to_dict() if gate else None


def app_name(job: JobSpec) -> str:
    return (job.serve.name if job.serve else None) or job.name


def connect(address: str | None, job: JobSpec | None = None) -> None:
    """Join the Ray at `address` (`auto`, ray://..., a GCS address) or start an embedded one (None)."""
    import ray

    if ray.is_initialized():
        return
    if address in (None, "", "local"):
        from steward.train.launch import connect as connect_local

        prefer_high_throughput(job.serve if job else None)

        connect_local(None, job) if job else ray.init(include_dashboard=False, log_to_driver=False)
        return
    try:
        ray.init(address=address, log_to_driver=False)
    except ConnectionError as err:
        raise ValueError(
            f"--address {address}: no Ray cluster there ({err}); start one with `ray start --head`"
        ) from None


def deploy(
    spec: JobSpec,
    run_dir: Path,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    override_fairness_gate: str | None = None,
) -> Deployed:
    """Deploy the run's model as the spec's serve section says; returns once every replica is up.

    A run that failed its fairness gate is refused unless `override_fairness_gate` gives a reason.
    """
    from ray import serve

    from steward.serve.app import build_app

    job = serving_spec(spec, run_dir)
    check_fairness_gate(job, run_dir, override_fairness_gate)
    if problem := reference_problem(job, run_dir):
        raise ValueError(problem)
    if address in (None, "", "local"):  # replicas of an embedded Ray see this environment: check keys up front
        load_keys(job.serve.auth if job.serve else None)
    gate = check_int8(job, run_dir)
    connect(address, job)
    serve.start(http_options={"host": host, "port": port})
    cfg = job.serve or ServeSpec()
    existed = app_name(job) in serve.status().applications
    serve.run(build_app(job, str(run_dir), gate), name=app_name(job), route_prefix=cfg.route_prefix)
    _record_deployment("deployment.updated" if existed else "deployment.created", job, run_dir, address)
    return Deployed(app_name(job), f"http://{host}:{port}{cfg.prefix}", run_dir, gate)


def _record_deployment(event: str, job: JobSpec, run_dir: Path, address: str | None) -> None:
    fields = audit.run_fields(run_dir) | {"deployment": app_name(job), "address": address or "local"}
    model_sha256 = audit.file_hash(Path(run_dir) / "model" / "model.safetensors")
    audit.record(event, log=audit.log_path(job.output_dir), **fields, model_sha256=model_sha256)


def status_rows(address: str | None = "auto") -> list[dict[str, Any]]:
    """One row per Serve application on the cluster: name, status, route, replicas per state."""
    from ray import serve

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
    """Delete the Serve application `name` (ValueError when there is none); audited under `output_dir`."""
    from ray import serve

    connect(address)
    if name not in serve.status().applications:
        raise ValueError(f"no Serve application named {name!r}; `steward serve status` lists them")
    serve.delete(name)
    stop_monitor(name)
    audit.record("deployment.stopped", log=audit.log_path(output_dir), deployment=name, address=address or "local")


def stop_monitor(name: str) -> None:
    """Save and stop the deployment's monitor actors (one per model version it served)."""
    import ray

    from steward.monitor.actor import NAMESPACE, actor_name

    mine = re.compile(re.escape(actor_name(name, "")) + r"\d{8}-\d{6}-[0-9a-f]{4}")  # the run id follows the name
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] == NAMESPACE and mine.fullmatch(actor["name"]):
            handle = ray.get_actor(actor["name"], namespace=NAMESPACE)
            ray.get(handle.persist.remote())
            ray.kill(handle, no_restart=True)


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
    from ray.serve.schema import ServeDeploySchema

    from steward.serve.app import DEPLOYMENT, deployment_options
    from steward.train.launch import worker_env

    job = serving_spec(spec, run_dir)
    check_fairness_gate(job, run_dir, override_fairness_gate, action="export")
    cfg = job.serve or ServeSpec()
    config = {
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": app_name(job),
            "route_prefix": cfg.route_prefix,
            "import_path": APP_BUILDER,
            "runtime_env": {"env_vars": worker_env(job)},
            "args": {"spec": job.model_dump(mode="json"), "run_dir": str(run_dir)},
            "deployments": [{"name": DEPLOYMENT, **deployment_options(cfg)}],
        }],
    }  # fmt: skip
    ServeDeploySchema.model_validate(config)  # refuse to write what `serve deploy` would reject
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config
