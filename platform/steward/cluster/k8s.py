"""KubeRay manifests from a spec: a RayJob (train or sweep) or a RayService (Serve), sized from the spec.

Pods run an image with steward installed (cluster/Dockerfile); run folders live on a ReadWriteMany volume claim
mounted at RUNS on every pod, so a RayService can serve what a RayJob trained; a URI output_dir (s3://, gs://) is
kept as it is (steward.storage). A RayService with serve.auth takes its API keys from a Kubernetes Secret.
"""

import copy
import math
import re
from pathlib import Path
from typing import Any, Literal

import yaml

from steward.errors import StewardError
from steward.serve.options import APP_BUILDER, DEPLOYMENT, app_name, deployment_options
from steward.spec import JobSpec
from steward.spec.serve import ServeSpec
from steward.spec.tracking import MODEL_URI
from steward.storage import is_uri

Kind = Literal["rayjob", "rayservice"]
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "steward:0.1.0"  # built by cluster/Dockerfile and pushed where the cluster can pull it
RUNS = "/mnt/steward/runs"  # where the run-folder volume is mounted in every pod
RUNS_CLAIM = "steward-runs"
SPEC_DIR = "/home/ray/steward"  # the job spec, mounted from a ConfigMap on the head
HEAD = {"cpu": "2", "memory": "8Gi"}
MEMORY_PER_CPU_GI = 4
API_KEYS_KEY = "api-keys"  # the key of the Secret that holds serve.auth's API keys
API_KEYS_DIR = "/etc/steward/api-keys"  # where that Secret is mounted for serve.auth.api_keys_file
_SECRET_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")  # DNS-1123 subdomain

Volume = tuple[str, dict, str]  # name, volume source, mount path


def manifests(
    spec: JobSpec,
    kind: Kind,
    image: str = DEFAULT_IMAGE,
    run_dir: str | None = None,
    api_keys_secret: str | None = None,
    model: str | None = None,
) -> list[dict]:
    """The Kubernetes objects to `kubectl apply`: a RayJob with its spec ConfigMap, or a RayService (of run_dir, of
    the registered version `model` names, or of the newest succeeded run).

    api_keys_secret names the Secret holding serve.auth's keys (default: api_keys_secret_name(spec)); only a
    RayService reads it: a RayJob trains or sweeps and starts no replica, so it must not wait for a Secret.
    """
    name = _k8s_name(spec.name)
    kept = is_uri(spec.output_dir) or Path(spec.output_dir).is_absolute()
    cluster_spec = spec.model_copy(update={"output_dir": spec.output_dir if kept else RUNS})
    if kind == "rayservice":
        served = {"model": registered_model(spec, model)} if model else {"run_dir": run_dir} if run_dir else {}
        return [ray_service(cluster_spec, name, image, served, api_keys_secret or api_keys_secret_name(spec))]
    return [spec_config_map(cluster_spec, name), ray_job(cluster_spec, name, image)]


def api_keys_secret_name(spec: JobSpec) -> str:
    """The default Secret for serve.auth's keys: the job's Kubernetes name and `-api-keys`."""
    return f"{_k8s_name(spec.name)}-api-keys"


def api_keys_secret_command(spec: JobSpec, secret: str | None = None) -> str | None:
    """The `kubectl create secret` a RayService of this spec needs before its pods start (None without auth)."""
    auth = spec.serve.auth if spec.serve else None
    if auth is None:
        return None
    value = "--from-literal=api-keys=KEY1,KEY2" if auth.api_keys_env else "--from-file=api-keys=KEYS_FILE"
    return f"kubectl create secret generic {secret or api_keys_secret_name(spec)} {value}"


def api_keys_in_pods(serve: ServeSpec, secret: str) -> tuple[ServeSpec, list[dict], list[Volume]]:
    """serve.auth's keys, from the Secret's API_KEYS_KEY, on every pod that can run a replica.

    api_keys_env: that variable comes from the Secret (secretKeyRef; comma-separated keys). api_keys_file: the
    Secret is mounted read-only at API_KEYS_DIR (one key a line) and the returned section points there, because
    the path the spec names is a file on the machine running `steward k8s`, not in the pod. Either way a missing
    Secret keeps the pods from starting (Kubernetes reports it on the pod) rather than a replica refusing to run.
    """
    auth = serve.auth
    if auth is None:
        return serve, [], []
    if not (len(secret) <= 253 and _SECRET_NAME.fullmatch(secret)):
        raise StewardError(
            f"--api-keys-secret {secret}: a Secret name is lowercase letters, digits, '-' and '.', starting and "
            "ending with a letter or digit; pass one like quickstart-api-keys"
        )
    if auth.api_keys_env is not None:
        ref = {"secretKeyRef": {"name": secret, "key": API_KEYS_KEY}}
        return serve, [{"name": auth.api_keys_env, "valueFrom": ref}], []
    volume = {"secret": {"secretName": secret, "items": [{"key": API_KEYS_KEY, "path": API_KEYS_KEY}]}}
    in_pod = auth.model_copy(update={"api_keys_file": f"{API_KEYS_DIR}/{API_KEYS_KEY}"})
    return serve.model_copy(update={"auth": in_pod}), [], [("api-keys", volume, API_KEYS_DIR)]


def spec_config_map(spec: JobSpec, name: str) -> dict:
    """The resolved spec as a ConfigMap the RayJob's head mounts (the entrypoint reads it from SPEC_DIR)."""
    body = yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-spec"}, "data": {"spec.yaml": body}}


def ray_job(spec: JobSpec, name: str, image: str) -> dict:
    """A RayJob running `steward train` (or `steward tune` for a spec with a tune section) on its own cluster."""
    stage = "tune" if spec.tune else "train"
    dist = spec.distributed
    trials = (spec.tune.max_concurrent_trials or spec.tune.num_trials) if spec.tune else 1
    # At least one run's workers from the start: steward checks the cluster's resources before training starts.
    group = worker_group(
        image,
        dist.cpus_per_worker,
        dist.gpus_per_worker if dist.use_gpu else 0.0,
        min_replicas=dist.num_workers,
        max_replicas=dist.num_workers * trials,
    )
    head = head_group(image, volumes=[("spec", {"configMap": {"name": f"{name}-spec"}}, SPEC_DIR)])
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "steward"}},
        "spec": {
            "entrypoint": f"python -m steward {stage} {SPEC_DIR}/spec.yaml --address auto",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 0,
            "rayClusterSpec": cluster(head, group),
        },
    }


def registered_model(spec: JobSpec, model: str) -> str:
    """`model` for a RayService: a registered version its pods fetch from the spec's MLflow server."""
    if not MODEL_URI.match(model):
        raise StewardError(f"--model {model!r}: expected models:/NAME@ALIAS (e.g. @champion) or models:/NAME/VERSION")
    if not (spec.tracking.uri or "").startswith(("http://", "https://")):
        raise StewardError(
            f"--model {model}: set tracking.uri to the http(s) address of the MLflow server the cluster's pods reach"
        )
    return model


def ray_service(spec: JobSpec, name: str, image: str, served: dict[str, str], api_keys_secret: str) -> dict:
    """A RayService whose serveConfigV2 is the spec's Serve application over a run folder on the runs volume, or
    a registered version fetched onto it (`served`: run_dir or model; neither: the newest succeeded run)."""
    if spec.serve is None:
        raise StewardError(
            "--kind rayservice: the spec has no `serve` section; add one (e.g. serve: {route_prefix: /x})"
        )
    # The head too: it has no CPUs for Ray, but a replica asking for none can still land there.
    cfg, env, volumes = api_keys_in_pods(spec.serve, api_keys_secret)
    spec = spec.model_copy(update={"serve": cfg})
    app = {
        "name": app_name(spec),
        "route_prefix": cfg.route_prefix,
        "import_path": APP_BUILDER,
        "runtime_env": {"env_vars": pod_env(spec)},
        "args": {"spec": spec.model_dump(mode="json"), **served},
        "deployments": [{"name": DEPLOYMENT, **deployment_options(cfg)}],
    }
    serve_config = {"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": [app]}
    low, high = cfg.replica_range
    group = worker_group(
        image, max(cfg.num_cpus, 1.0), cfg.num_gpus, min_replicas=low, max_replicas=high, env=env, volumes=volumes
    )
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "steward"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster(head_group(image, env=env, volumes=volumes), group),
        },
    }


def pod_env(spec: JobSpec) -> dict[str, str]:
    """Environment of steward's Ray processes in pods (fixed: a manifest must not depend on the caller's shell)."""
    return {"DS_ACCELERATOR": "cuda" if spec.distributed.use_gpu else "cpu", "RAY_USAGE_STATS_ENABLED": "0"}


def cluster(head: dict, group: dict) -> dict:
    """A RayCluster spec with KubeRay's in-tree Ray autoscaler on, scaling the worker group within its bounds."""
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 60},
        "headGroupSpec": head,
        "workerGroupSpecs": [group],
    }


def head_group(image: str, env: list[dict] | None = None, volumes: list[Volume] | None = None) -> dict:
    """The head pod: the dashboard (Jobs API) open to the cluster, no training work scheduled on it (num-cpus 0)."""
    pod_volumes, mounts = _volumes(volumes or [])
    container = {
        "name": "ray-head",
        "image": image,
        "resources": {"requests": dict(HEAD), "limits": dict(HEAD)},
        "ports": [{"containerPort": p, "name": n} for n, p in (("gcs", 6379), ("dashboard", 8265), ("serve", 8000))],
        "volumeMounts": mounts,
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}, *copy.deepcopy(env or [])],
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {"spec": {"containers": [container], "volumes": pod_volumes}},
    }


def worker_group(
    image: str,
    cpus: float,
    gpus: float,
    min_replicas: int,
    max_replicas: int,
    env: list[dict] | None = None,
    volumes: list[Volume] | None = None,
) -> dict:
    """One pod per Ray Train worker (or Serve replica): its CPUs, memory and GPUs as Kubernetes requests."""
    pod_volumes, mounts = _volumes(volumes or [])
    cpu = str(max(1, math.ceil(cpus)))
    resources: dict[str, Any] = {"cpu": cpu, "memory": f"{int(cpu) * MEMORY_PER_CPU_GI}Gi"}
    if gpus:
        resources["nvidia.com/gpu"] = str(math.ceil(gpus))
    container = {
        "name": "ray-worker",
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}, *copy.deepcopy(env or [])],
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": pod_volumes}
    if gpus:  # GPU nodes are usually tainted so that only GPU work lands there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "groupName": "gpu-workers" if gpus else "cpu-workers",
        "replicas": min_replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max(max_replicas, min_replicas, 1),
        "rayStartParams": {},
        "template": {"spec": pod},
    }


def _volumes(extra: list[Volume]) -> tuple[list[dict], list[dict]]:
    """The pod's volumes and the container's mounts: the runs claim at RUNS, then `extra` (copied: pods that share
    nothing in Python dump without YAML anchors and can be edited one at a time)."""
    every: list[Volume] = [("runs", {"persistentVolumeClaim": {"claimName": RUNS_CLAIM}}, RUNS), *extra]
    return (
        [{"name": name, **copy.deepcopy(source)} for name, source, _ in every],
        [{"name": name, "mountPath": path} for name, _, path in every],
    )


def _k8s_name(name: str) -> str:
    """A DNS-1035 label: lowercase letters, digits and '-', starting with a letter."""
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return ("s-" + cleaned if not cleaned[:1].isalpha() else cleaned)[:40].rstrip("-")


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (the spec, serveConfigV2), so manifests stay readable and diffable."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(documents: list[dict]) -> str:
    """The manifests as one multi-document YAML stream."""
    return "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False) for d in documents)
