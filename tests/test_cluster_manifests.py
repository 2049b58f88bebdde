"""Manifests: KubeRay RayJob / RayService from specs, validated against the real CRD schemas; cluster-launcher
configs validated against the schema inside the ray package; the example manifests in cluster/k8s stay generated."""

import copy
import functools
import json
import os
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from steward.cluster.k8s import dump, manifests
from steward.errors import StewardError
from steward.spec import load_job
from tests.conftest import JOBS, ROOT

CRDS = ROOT.parent / "shared" / "kuberay-crds"  # ../shared relative to the repo: reference data, never copied in
EXAMPLES = ROOT / "cluster" / "k8s"


@pytest.fixture
def kuberay_crds():
    """The KubeRay CRD folder. Missing, the tests that need it fail under CI=true (CI lays ../shared beside the
    clone, so a missing folder there is a broken set-up, not an optional extra) and skip elsewhere."""
    if not CRDS.is_dir():
        missing = f"KubeRay CRDs not found at {CRDS} (../shared/kuberay-crds, beside the repository)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true needs them", pytrace=False)
        pytest.skip(missing)
    return CRDS


needs_crds = pytest.mark.usefixtures("kuberay_crds")


def strict(schema):
    """The CRD schema as the API server prunes it: an object with `properties` admits no other keys.

    KubeRay's schemas leave additionalProperties open because Kubernetes drops unknown fields silently; closing them
    turns a misspelt field (which the cluster would ignore) into a test failure, like `kubectl apply --validate=strict`.
    """
    schema = copy.deepcopy(schema)

    def close(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.cache
def crd_validator(kind):
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each: libyaml reads them 10x faster
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def assert_valid(document):
    errors = sorted(crd_validator(document["kind"]).iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def workers(cluster_spec):
    (group,) = cluster_spec["workerGroupSpecs"]
    return group, group["template"]["spec"]["containers"][0]["resources"]["requests"]


@needs_crds
def test_rayjob_for_training_is_valid_and_sized_from_the_spec():
    spec = load_job(JOBS / "quickstart.yaml", ["distributed.num_workers=3", "distributed.cpus_per_worker=2"])
    config_map, job = manifests(spec, "rayjob", image="registry.example/steward:1")
    assert_valid(job)
    assert config_map["kind"] == "ConfigMap" and yaml.safe_load(config_map["data"]["spec.yaml"])["name"] == "quickstart"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"] == "python -m steward train /home/ray/steward/spec.yaml --address auto"
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    group, requests = workers(cluster)
    assert (group["minReplicas"], group["maxReplicas"], requests["cpu"]) == (3, 3, "2")
    assert "nvidia.com/gpu" not in requests
    assert group["template"]["spec"]["containers"][0]["image"] == "registry.example/steward:1"
    # run folders go to the shared volume, not into the pod's own disk
    assert yaml.safe_load(config_map["data"]["spec.yaml"])["output_dir"] == "/mnt/steward/runs"
    # a bucket URI is cluster storage already: kept, query parameters and all
    uri = "s3://bucket/runs?region=eu-west-1"
    config_map, _ = manifests(load_job(JOBS / "quickstart.yaml", [f"output_dir={uri}"]), "rayjob")
    assert yaml.safe_load(config_map["data"]["spec.yaml"])["output_dir"] == uri


@needs_crds
def test_gpu_spec_requests_gpus_and_a_sweep_scales_to_its_concurrent_trials():
    spec = load_job(JOBS / "tune-digits-asha.yaml", ["distributed.use_gpu=true", "tune.max_concurrent_trials=3"])
    _, job = manifests(spec, "rayjob")
    assert_valid(job)
    assert job["spec"]["entrypoint"].startswith("python -m steward tune ")
    group, requests = workers(job["spec"]["rayClusterSpec"])
    assert requests["nvidia.com/gpu"] == "1" and group["groupName"] == "gpu-workers"
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 3)


@needs_crds
def test_rayservice_carries_the_serve_autoscaling_and_ray_autoscaler_bounds():
    spec = load_job(JOBS / "quickstart.yaml", ["serve.autoscaling.max_replicas=5", "serve.num_cpus=2"])
    (service,) = manifests(spec, "rayservice", run_dir="/mnt/steward/runs/quickstart/20260101-000000-abcd")
    assert_valid(service)
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)  # what KubeRay hands to Serve must be a valid Serve config
    (app,) = config["applications"]
    assert app["args"]["run_dir"].endswith("abcd") and app["route_prefix"] == "/digits"
    auto = app["deployments"][0]["autoscaling_config"]
    assert (auto["min_replicas"], auto["max_replicas"]) == (1, 5)
    cluster = service["spec"]["rayClusterConfig"]
    group, requests = workers(cluster)
    assert cluster["enableInTreeAutoscaling"] is True
    assert (group["minReplicas"], group["maxReplicas"], requests["cpu"]) == (1, 5, "2")


def test_rayservice_needs_a_serve_section():
    spec = load_job(JOBS / "tune-digits-asha.yaml")
    with pytest.raises(StewardError, match="no `serve` section"):
        manifests(spec, "rayservice")


@needs_crds
def test_strict_validation_catches_a_misspelt_field():
    _, job = manifests(load_job(JOBS / "quickstart.yaml"), "rayjob")
    job["spec"]["shutdownAfterJobFinish"] = True
    assert any("shutdownAfterJobFinish" in e.message for e in crd_validator("RayJob").iter_errors(job))


EXAMPLE_SOURCES = {
    "quickstart-rayjob.yaml": ("quickstart.yaml", "rayjob"),
    "tune-digits-asha-rayjob.yaml": ("tune-digits-asha.yaml", "rayjob"),
    "quickstart-rayservice.yaml": ("quickstart.yaml", "rayservice"),
}


@pytest.mark.parametrize("example", sorted(EXAMPLE_SOURCES))
def test_example_manifests_are_generated_from_jobs_and_valid(example):
    job, kind = EXAMPLE_SOURCES[example]
    text = (EXAMPLES / example).read_text()
    regenerate = f"steward k8s jobs/{job} --kind {kind} --out cluster/k8s/{example}"
    assert text == dump(manifests(load_job(JOBS / job), kind)), f"stale example: regenerate with `{regenerate}`"
    if CRDS.is_dir():
        for document in yaml.safe_load_all(text):
            if document["apiVersion"] == "ray.io/v1":
                assert_valid(document)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_cluster_launcher_configs_follow_rays_schema(cloud):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / f"{cloud}.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # CPU head
    gpu = [t for name, t in types.items() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] < t["max_workers"] for t in gpu)  # GPU workers, autoscaled
    assert config["provider"]["type"] == cloud


def replica_containers(service):
    """The head's and every worker group's container: Serve can place a replica on any of them."""
    cluster = service["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    return [(pod, pod["containers"][0]) for pod in pods]


@needs_crds
def test_rayservice_with_auth_takes_the_api_keys_env_from_a_secret():
    spec = load_job(JOBS / "quickstart.yaml", ["serve.auth.api_keys_env=STEWARD_API_KEYS"])
    (service,) = manifests(spec, "rayservice")
    assert_valid(service)
    for _, container in replica_containers(service):
        ref = {"secretKeyRef": {"name": "quickstart-api-keys", "key": "api-keys"}}
        assert {"name": "STEWARD_API_KEYS", "valueFrom": ref} in container["env"]
    assert "&id" not in dump([service])  # each container spells its env out, no YAML anchors
    (named,) = manifests(spec, "rayservice", api_keys_secret="team.serving-keys")
    assert_valid(named)
    assert all(
        e["valueFrom"]["secretKeyRef"]["name"] == "team.serving-keys"
        for _, c in replica_containers(named)
        for e in c["env"]
        if "valueFrom" in e
    )
    with pytest.raises(StewardError, match="--api-keys-secret Keys_1"):
        manifests(spec, "rayservice", api_keys_secret="Keys_1")
    # a RayJob starts no replica: it neither needs nor waits for the Secret
    _, job = manifests(spec, "rayjob")
    assert "secretKeyRef" not in dump([job])


@needs_crds
def test_rayservice_with_an_api_keys_file_mounts_it_from_the_secret():
    spec = load_job(JOBS / "quickstart.yaml", ["serve.auth.api_keys_file=keys.txt"])
    (service,) = manifests(spec, "rayservice")
    assert_valid(service)
    app = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    # the replica reads the Secret's file in the pod, not the path on the machine that wrote the manifest
    assert app["args"]["spec"]["serve"]["auth"]["api_keys_file"] == "/etc/steward/api-keys/api-keys"
    for pod, container in replica_containers(service):
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "quickstart-api-keys"
        assert {"name": volume["name"], "mountPath": "/etc/steward/api-keys"} in container["volumeMounts"]


SHARED_FOLDER = {"aws": "/mnt/efs", "gcp": "/mnt/filestore"}


@pytest.mark.parametrize("cloud", sorted(SHARED_FOLDER))
def test_cluster_launcher_mounts_the_shared_folder_into_the_container_or_fails(cloud):
    config = yaml.safe_load((ROOT / "cluster" / f"{cloud}.yaml").read_text())
    folder = SHARED_FOLDER[cloud]
    assert f"--volume={folder}:{folder}" in config["docker"]["run_options"]  # run folders are shared in Ray's container
    (mount,) = [c for c in config["initialization_commands"] if " mount " in c]
    assert folder in mount and "|| true" not in mount and mount.rstrip().endswith("exit 1; }")
