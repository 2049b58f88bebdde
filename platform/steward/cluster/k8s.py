"""KubeRay manifests from a spec: a RayJob (train or sweep) or a RayService (Serve), sized from the spec.

Pods run an image with steward installed (cluster/Dockerfile); run folders live on a ReadWriteMany volume claim
mounted at RUNS on every pod, so a RayService can serve what a RayJob trained; a URI output_dir (s3://, gs://) is
kept as it is (steward.storage).
"""

import math
from pathlib import Path
from typing import Any, Literal

import yaml

from steward.errors import StewardError
from steward.serve.options import APP_BUILDER, DEPLOYMENT, app_name, deployment_options
from steward.spec import JobSpec
from steward.storage import is_uri

Kind = Literal["rayjob", "rayservice"]
RAY_VERSION = "2.60.0"
DEFAULT_IMAGE = "steward:0.1.0"  # built by cluster/Dockerfile and pushed where the cluster can pull it
RUNS = "/mnt/steward/runs"  # where the run-folder volume is mounted in every pod
RUNS_CLAIM = "steward-runs"
SPEC_DIR = "/home/ray/steward"  # the job spec, mounted from a ConfigMap on the head
HEAD = {"cpu": "2", "memory": "8Gi"}
MEMORY_PER_CPU_GI = 4


def manifests(spec: JobSpec, kind: Kind, image: str = DEFAULT_IMAGE, run_dir: str | None = None) -> list[dict]:
    """The Kubernetes objects to `kubectl apply`: a RayJob with its spec ConfigMap, or a RayService."""
    name = _k8s_name(spec.name)
    kept = is_uri(spec.output_dir) or Path(spec.output_dir).is_absolute()
    cluster_spec = spec.model_copy(update={"output_dir": spec.output_dir if kept else RUNS})
    if kind == "rayservice":
        return [ray_service(cluster_spec, name, image, run_dir)]
    return [spec_config_map(cluster_spec, name), ray_job(cluster_spec, name, image)]


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
    head = head_group(image, extra_volume=("spec", {"configMap": {"name": f"{name}-spec"}}, SPEC_DIR))
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


def ray_service(spec: JobSpec, name: str, image: str, run_dir: str | None) -> dict:
    """A RayService whose serveConfigV2 is the spec's Serve application over a run folder on the runs volume."""
    if spec.serve is None:
        raise StewardError(
            "--kind rayservice: the spec has no `serve` section; add one (e.g. serve: {route_prefix: /x})"
        )
    cfg = spec.serve
    app = {
        "name": app_name(spec),
        "route_prefix": cfg.route_prefix,
        "import_path": APP_BUILDER,
        "runtime_env": {"env_vars": pod_env(spec)},
        # No run_dir: the newest succeeded run of the spec under output_dir (the runs volume) is served.
        "args": {"spec": spec.model_dump(mode="json"), **({"run_dir": run_dir} if run_dir else {})},
        "deployments": [{"name": DEPLOYMENT, **deployment_options(cfg)}],
    }
    serve_config = {"http_options": {"host": "0.0.0.0", "port": 8000}, "applications": [app]}
    low, high = cfg.replica_range
    group = worker_group(image, max(cfg.num_cpus, 1.0), cfg.num_gpus, min_replicas=low, max_replicas=high)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "steward"}},
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config, sort_keys=False),
            "rayClusterConfig": cluster(head_group(image), group),
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


def head_group(image: str, extra_volume: tuple[str, dict, str] | None = None) -> dict:
    """The head pod: the dashboard (Jobs API) open to the cluster, no training work scheduled on it (num-cpus 0)."""
    volumes, mounts = _runs_volume()
    if extra_volume:
        volumes.append({"name": extra_volume[0], **extra_volume[1]})
        mounts.append({"name": extra_volume[0], "mountPath": extra_volume[2]})
    container = {
        "name": "ray-head",
        "image": image,
        "resources": {"requests": dict(HEAD), "limits": dict(HEAD)},
        "ports": [{"containerPort": p, "name": n} for n, p in (("gcs", 6379), ("dashboard", 8265), ("serve", 8000))],
        "volumeMounts": mounts,
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
    }
    return {
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": {"spec": {"containers": [container], "volumes": volumes}},
    }


def worker_group(image: str, cpus: float, gpus: float, min_replicas: int, max_replicas: int) -> dict:
    """One pod per Ray Train worker (or Serve replica): its CPUs, memory and GPUs as Kubernetes requests."""
    volumes, mounts = _runs_volume()
    cpu = str(max(1, math.ceil(cpus)))
    resources: dict[str, Any] = {"cpu": cpu, "memory": f"{int(cpu) * MEMORY_PER_CPU_GI}Gi"}
    if gpus:
        resources["nvidia.com/gpu"] = str(math.ceil(gpus))
    container = {
        "name": "ray-worker",
        "image": image,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
        "env": [{"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}],
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
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


def _runs_volume() -> tuple[list[dict], list[dict]]:
    return (
        [{"name": "runs", "persistentVolumeClaim": {"claimName": RUNS_CLAIM}}],
        [{"name": "runs", "mountPath": RUNS}],
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
