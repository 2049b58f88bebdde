"""Ray tier: a real Ray Serve instance, real HTTP requests, models trained for real (in-process, seconds).

One Serve per module on a free port; every test deploys what it needs and the autouse fixture deletes it after.
"""

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from steward.ray_env import HAPROXY_PORTS, free_port, take_haproxy_ports
from steward.serve.deploy import deploy
from steward.serve.labels import REQUEST_ID_LENGTH
from steward.serve.quantize import QuantizationRefused
from steward.serve.timing import parse_header
from steward.spec.serve import ServeSpec
from tests.serving import (
    offline_probabilities,
    post,
    serve_it,
    serve_mode_as_the_cli_picks_it,
    trained_run,
    validation_inputs,
    wait_for,
)

pytestmark = pytest.mark.slow

FAMILIES = {
    "cnn": ("quickstart.yaml", []),
    "lstm": ("digits-lstm.yaml", ["model.params.hidden_size=32"]),
    "transformer": ("text-transformer.yaml", ["data.options.num_samples=1500"]),
}


@pytest.fixture(scope="module", autouse=True)
def _serve_mode_as_the_cli_picks_it():
    """Serve in the mode `steward serve` picks for fixed replicas (HAProxy high-throughput when installed)."""
    with serve_mode_as_the_cli_picks_it(ServeSpec(num_replicas=1)):
        yield


def test_an_embedded_serve_takes_free_haproxy_ports_where_another_serve_holds_the_defaults(monkeypatch):
    monkeypatch.setattr(os, "environ", {"RAY_SERVE_HAPROXY_METRICS_PORT": "9999"})  # the user's setting stays
    with socket.socket() as held:
        try:
            held.bind(("0.0.0.0", HAPROXY_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"]))
            held.listen()
        except OSError:
            pass  # another process here holds it already: the same case
        take_haproxy_ports()
        stats = int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert stats != HAPROXY_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"]
    with socket.socket() as s:
        s.bind(("0.0.0.0", stats))  # free
    assert os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"] == "9999"


def test_two_embedded_serves_starting_together_do_not_both_take_the_default_haproxy_ports(monkeypatch):
    """HAProxy binds seconds after the ports are chosen: a steward that has just chosen a default holds a claim on it,
    and another starting meanwhile takes a free port."""
    import subprocess
    import sys

    claim = "from steward.ray_env import _claim; import sys; print(_claim(int(sys.argv[1])), flush=True); input()"
    port = HAPROXY_PORTS["RAY_SERVE_HAPROXY_STATS_PORT"]
    other = subprocess.Popen(
        [sys.executable, "-c", claim, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        claimed = other.stdout.readline().strip() == "True"  # False: this test process claimed it earlier
        monkeypatch.setattr(os, "environ", {})
        take_haproxy_ports()
        if claimed:
            assert int(os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]) != port
    finally:
        other.communicate("", timeout=30)
    assert claimed or "RAY_SERVE_HAPROXY_STATS_PORT" not in os.environ  # then this process holds the default


def test_free_ports_are_claimed_outside_the_ranges_the_kernel_and_ray_hand_out():
    """A server binds its port later than it is chosen (HAProxy: seconds): the port is one no bind(0), outgoing
    connection or Ray worker takes meanwhile, and another process on the machine choosing at once gets another."""
    import subprocess
    import sys

    draw = "from steward.ray_env import free_port; print([free_port() for _ in range(50)], flush=True); input()"
    other = subprocess.Popen([sys.executable, "-c", draw], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        theirs = set(json.loads(other.stdout.readline()))
        mine = {free_port() for _ in range(50)}
    finally:
        other.communicate("", timeout=30)
    assert len(mine) == len(theirs) == 50 and not mine & theirs
    assert all(20000 <= port < 30000 for port in mine | theirs)  # this machine's ephemeral range starts above


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One trained run per model family: {family: (spec, run_dir)}."""
    root = tmp_path_factory.mktemp("serve-runs")
    return {family: trained_run(root / family, job, *extra) for family, (job, extra) in FAMILIES.items()}


def oip_input(family, instances):
    if family == "transformer":
        return {"name": "input", "shape": [len(instances)], "datatype": "BYTES", "data": instances}
    array = np.asarray(instances, dtype=np.float32)
    return {"name": "input", "shape": list(array.shape), "datatype": "FP32", "data": array.reshape(-1).tolist()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_served_predictions_equal_the_offline_model_and_oip_round_trips(runs, serve_port, family):
    spec, run_dir = runs[family]
    url = serve_it(runs, serve_port, family, batching={"max_batch_size": 8, "batch_wait_timeout_ms": 20})
    instances = validation_inputs(spec, 24)
    expected = offline_probabilities(run_dir, spec, instances)
    # Concurrent single-instance requests, so the batched path mixes requests into one forward pass.
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda x: post(f"{url}/predict", json={"instances": [x]}), instances))
    assert all(r.status_code == 200 for r in replies), replies[0].text
    served = np.array([r.json()["predictions"][0]["probabilities"] for r in replies])
    np.testing.assert_allclose(served, expected, atol=1e-5)
    # where each request's time went in the replica: within what the client waited
    for reply in replies:
        phases = parse_header(reply.headers["Server-Timing"])
        assert {"parse", "prepare", "wait", "encode", "forward", "reply"} <= phases.keys(), phases
        assert min(phases.values()) >= 0 and sum(phases.values()) <= reply.elapsed.total_seconds() * 1000
    body = replies[0].json()
    # a monitored deployment's ids carry its signature (what /feedback checks); others are plain uuids
    id_length = REQUEST_ID_LENGTH if spec.monitor else 32
    assert body["model_version"] == run_dir.name and len(body["predictions"][0]["request_id"]) == id_length
    assert body["predictions"][0]["label"] == body["labels"][int(expected[0].argmax())]

    infer = post(f"{url}/v2/models/{spec.name}/infer", json={"id": "r1", "inputs": [oip_input(family, instances)]})
    assert infer.status_code == 200, infer.text
    outputs = {o["name"]: o for o in infer.json()["outputs"]}
    assert infer.json()["id"] == "r1" and outputs["probabilities"]["shape"] == list(expected.shape)
    issued = infer.json()["parameters"]["request_ids"]  # what /feedback takes: the server's ids, not the client's
    assert len(issued) == len(set(issued)) == len(instances) and all(len(i) == id_length for i in issued)
    np.testing.assert_allclose(np.reshape(outputs["probabilities"]["data"], expected.shape), expected, atol=1e-5)
    assert outputs["class_id"]["data"] == expected.argmax(-1).tolist()
    # as KServe's SDK sends it: the model's name in the body too, and only the outputs asked for
    asked = {"model_name": spec.name, "inputs": [oip_input(family, instances)], "outputs": [{"name": "label"}]}
    (label,) = post(f"{url}/v2/models/{spec.name}/infer", json=asked).json()["outputs"]
    assert label["name"] == "label" and label["data"] == [body["labels"][i] for i in expected.argmax(-1)]


def test_health_metadata_and_model_info(runs, serve_port):
    spec, run_dir = runs["cnn"]
    url = serve_it(runs, serve_port, "cnn")
    assert requests.get(f"{url}/healthz").json()["status"] == "ok"
    assert requests.get(f"{url}/v2/health/ready").json() == {"ready": True}
    meta = requests.get(f"{url}/v2/models/{spec.name}").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
    assert requests.get(f"{url}/v2/models/nope").status_code == 404
    assert requests.get(f"{url}/v2").json()["name"] == "steward"  # OIP server metadata
    info = requests.get(f"{url}/info").json()
    status = json.loads((run_dir / "status.json").read_text())
    assert info["run_id"] == run_dir.name and info["spec_hash"] == status["spec_hash"]
    assert info["training_metrics"] == json.loads((run_dir / "metrics.json").read_text())


def test_auth_401_without_a_valid_key_200_with_one(runs, serve_port, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# serving keys\nfirst-key-123\nsecond-key-456  # the rotation key\n")
    spec, _ = runs["cnn"]
    url = serve_it(runs, serve_port, "cnn", auth={"api_keys_file": str(keys)})
    body = {"instances": validation_inputs(spec, 1)}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "first-key-12"}, {"Authorization": "x"}):
        refused = post(f"{url}/predict", json=body, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
        assert "key-123" not in refused.text and "key-456" not in refused.text
    assert requests.get(f"{url}/info").status_code == 401
    assert post(f"{url}/v2/models/{spec.name}/infer", json={}).status_code == 401  # before the body is looked at
    assert post(f"{url}/predict", json=body, headers={"Authorization": "Bearer first-key-123"}).status_code == 200
    assert post(f"{url}/predict", json=body, headers={"X-API-Key": "second-key-456"}).status_code == 200
    assert requests.get(f"{url}/healthz").status_code == 200  # load balancers probe without a key
    assert requests.get(f"{url}/openapi.json").status_code == 401
    schema = requests.get(f"{url}/openapi.json", headers={"X-API-Key": "second-key-456"}).json()
    assert "/predict" in schema["paths"] and "/openapi.json" not in schema["paths"]


def test_batching_really_batches_under_concurrent_load(runs, serve_port):
    spec, _ = runs["cnn"]
    url = serve_it(runs, serve_port, "cnn", batching={"max_batch_size": 8, "batch_wait_timeout_ms": 50})
    instance = validation_inputs(spec, 1)
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: post(f"{url}/predict", json={"instances": instance}).status_code, range(64)))
    assert codes == [200] * 64
    sizes = {int(k): v for k, v in requests.get(f"{url}/info").json()["replica"]["batch_sizes"].items()}
    assert sum(size * count for size, count in sizes.items()) == 64
    assert max(sizes) > 1 and max(sizes) <= 8, sizes
    assert sum(count for size, count in sizes.items() if size > 1) >= 4, sizes


def test_int8_transformer_is_served_after_passing_its_gate(runs, serve_port):
    spec, run_dir = runs["transformer"]
    url = serve_it(runs, serve_port, "transformer", quantize="int8", num_cpus=1)
    info = requests.get(f"{url}/info").json()
    gate = info["int8_gate"]
    assert gate["passed"] and gate["fp32_accuracy"] - gate["int8_accuracy"] <= 0.01
    assert info["model_version"] == run_dir.name + "-int8"
    instances = validation_inputs(spec, 16)
    reply = post(f"{url}/predict", json={"instances": instances}).json()
    served = np.array([p["probabilities"] for p in reply["predictions"]])
    np.testing.assert_allclose(served, offline_probabilities(run_dir, spec, instances, int8=True), atol=1e-4)
    fp32 = offline_probabilities(run_dir, spec, instances)
    assert (served.argmax(-1) == fp32.argmax(-1)).mean() >= 0.9


def damage_for_int8(run_dir):
    """Rescale one hidden unit of the CNN head by 1e4 and its outgoing weights by 1e-4.

    ReLU is positively homogeneous, so the fp32 function is unchanged, but per-tensor int8 scales now span 1e4x
    the other units' range and round them to zero: the model is fine in fp32 and broken in int8.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(str(run_dir / "model" / "model.safetensors"))
    weights["head.2.weight"][0] *= 1e4
    weights["head.2.bias"][0] *= 1e4
    weights["head.5.weight"][:, 0] *= 1e-4
    save_file(weights, str(run_dir / "model" / "model.safetensors"), {"format": "pt"})


def test_the_int8_gate_refuses_a_damaged_model(runs, serve_port, tmp_path):
    import shutil

    import yaml
    from ray import serve

    from steward.evaluate.run import evaluate_model
    from steward.serve.app import app_builder
    from steward.serve.deploy import export_config

    spec, run_dir = runs["cnn"]
    damaged = tmp_path / run_dir.name
    shutil.copytree(run_dir, damaged)
    damage_for_int8(damaged)
    before = evaluate_model(run_dir / "model", spec, "validation")["overall"]["accuracy"]
    assert evaluate_model(damaged / "model", spec, "validation")["overall"]["accuracy"] == pytest.approx(before)
    job = spec.model_copy(update={"serve": ServeSpec(route_prefix="/damaged", quantize="int8", num_cpus=0.5)})
    with pytest.raises(QuantizationRefused, match=r"serve.quantize: int8 validation accuracy .* points below fp32"):
        deploy(job, damaged, port=serve_port)
    assert "quickstart" not in serve.status().applications
    # A Serve config file deploys without steward's driver: building its application checks too, before any replica.
    export_config(job, damaged, tmp_path / "damaged.yaml")
    [application] = yaml.safe_load((tmp_path / "damaged.yaml").read_text())["applications"]
    with pytest.raises(QuantizationRefused, match=r"serve.quantize: int8 validation accuracy .* points below fp32"):
        app_builder(application["args"])


BAD_IMAGE_REQUESTS = [
    ("oversize body", b'{"instances": [' + b"0, " * 40_000 + b"0]}", 413, "body"),
    ("non-UTF-8 body", b'{"instances": ["\xff\xfe"]}', 400, "body"),
    ("malformed JSON", b'{"instances": [', 400, "body"),
    (
        "NaN",
        b'{"instances": [[' + b", ".join([b"[" + b", ".join([b"NaN"] * 8) + b"]"] * 8) + b"]]}",
        422,
        "instances[0]",
    ),
    ("infinity", json.dumps({"instances": [[[1e999] * 8] * 8]}).encode(), 422, "instances[0]"),
    ("wrong shape", json.dumps({"instances": [[[0.0] * 7] * 8]}).encode(), 422, "instances[0]"),
    ("wrong type", json.dumps({"instances": ["a digit"]}).encode(), 422, "instances[0]"),
    ("too many instances", json.dumps({"instances": [[[0.0] * 8] * 8] * 5}).encode(), 413, "instances"),
    ("no instances", json.dumps({"instances": []}).encode(), 422, "instances"),
    ("unknown key", json.dumps({"instances": [[[0.0] * 8] * 8], "extra": 1}).encode(), 422, "extra"),
    # finite, but overflows inside the CNN: refused rather than answered with NaN probabilities
    (
        "overflowing instance",
        json.dumps({"instances": [[[0.0] * 8] * 8, [[3e38] * 8] * 8]}).encode(),
        422,
        "instances[1]",
    ),
    (
        "lone surrogate group",
        json.dumps({"instances": [[[0.0] * 8] * 8], "attributes": {"group": ["\ud800"]}}).encode(),
        422,
        "attributes.group[0]",
    ),
    (
        "overlong group",
        json.dumps({"instances": [[[0.0] * 8] * 8], "attributes": {"group": ["x" * 200]}}).encode(),
        422,
        "attributes.group[0]",
    ),
    (
        "attributes of the wrong length",
        json.dumps({"instances": [[[0.0] * 8] * 8], "attributes": {"g": [1, 2]}}).encode(),
        422,
        "attributes",
    ),
]


def test_every_bad_input_gets_its_4xx_and_the_next_good_request_succeeds(runs, serve_port):
    spec, _ = runs["cnn"]
    url = serve_it(runs, serve_port, "cnn", max_instances=4, max_body_bytes=65_536)
    good = {"instances": validation_inputs(spec, 2), "attributes": {"group": ["a", "b"]}}
    for case, body, status, field in BAD_IMAGE_REQUESTS:
        refused = post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
        assert refused.status_code == status, f"{case}: {refused.status_code} {refused.text}"
        assert refused.json()["field"] == field, f"{case}: {refused.text}"
        assert post(f"{url}/predict", json=good).status_code == 200, f"after {case}"
    oip = f"{url}/v2/models/{spec.name}/infer"
    bad_oip = [
        ({"inputs": [{"name": "x", "shape": [1, 8, 7], "datatype": "FP32", "data": [0.0] * 56}]}, "inputs[0].shape"),
        (
            {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "BYTES", "data": ["a"] * 64}]},
            "inputs[0].datatype",
        ),
        ({"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": [0.0] * 60}]}, "inputs[0].data"),
        ({"inputs": [{"name": "x", "shape": [5, 8, 8], "datatype": "FP32", "data": [0.0] * 320}]}, "inputs[0].shape"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "INT32", "data": [0.5] * 64}]}, "inputs[0].data"),
        ({"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "FP32", "data": ["0.5"] * 64}]}, "inputs[0].data"),
        (
            {"inputs": [{"name": "x", "shape": [1, 8, 8], "datatype": "BOOL", "data": [True] * 64}]},
            "inputs[0].datatype",
        ),
        ({"model_name": "other", "inputs": [oip_input("cnn", good["instances"])]}, "model_name"),
        ({"inputs": [oip_input("cnn", good["instances"])], "outputs": [{"name": "logits"}]}, "outputs[0].name"),
    ]
    for body, field in bad_oip:
        refused = post(oip, json=body)
        assert 400 <= refused.status_code < 500 and refused.json()["field"] == field, refused.text
    assert post(oip, json={"inputs": [oip_input("cnn", good["instances"])]}).status_code == 200


def test_bad_text_inputs_are_refused_by_field(runs, serve_port):
    spec, _ = runs["transformer"]
    url = serve_it(runs, serve_port, "transformer")
    for instances, field in (
        (["fine", 3], "instances[1]"),
        (["\ud800 lone surrogate"], "instances[0]"),
        ([["nested"]], "instances[0]"),
    ):
        body = json.dumps({"instances": instances}).encode()  # json escapes the surrogate as \\ud800
        refused = post(f"{url}/predict", data=body, headers={"Content-Type": "application/json"})
        assert refused.status_code == 422 and refused.json()["field"] == field, refused.text
    assert post(f"{url}/predict", json={"instances": ["a good sentence"]}).status_code == 200


def test_exported_config_deploys_and_serves(runs, serve_port, tmp_path):
    import yaml
    from ray import serve

    from steward.serve.app import app_builder
    from steward.serve.deploy import export_config

    spec, run_dir = runs["cnn"]
    job = spec.model_copy(update={"serve": ServeSpec(route_prefix="/exported", num_cpus=0.5)})
    path = tmp_path / "serve" / "quickstart.yaml"
    export_config(job, run_dir, path)
    [application] = yaml.safe_load(path.read_text())["applications"]
    assert application["import_path"] == "steward.serve.app:app_builder"
    serve.run(app_builder(application["args"]), name=application["name"], route_prefix=application["route_prefix"])
    reply = post(f"http://127.0.0.1:{serve_port}/exported/predict", json={"instances": validation_inputs(spec, 1)})
    assert reply.status_code == 200 and reply.json()["model_version"] == run_dir.name


def gcs_address():
    import ray

    return ray.get_runtime_context().gcs_address


def test_cli_serve_status_and_stop_on_a_running_cluster(runs, serve_port):
    from tests.test_cli import steward

    spec, run_dir = runs["cnn"]
    address = ["--address", gcs_address()]
    out = steward(
        "serve",
        str(run_dir / "spec.yaml"),
        "--run",
        str(run_dir),
        "--port",
        str(serve_port),
        *address,
        "--set",
        "serve={route_prefix: /cli, num_cpus: 0.5}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"http://127.0.0.1:{serve_port}/cli/predict" in out.stdout
    reply = post(f"http://127.0.0.1:{serve_port}/cli/predict", json={"instances": validation_inputs(spec, 1)})
    assert reply.status_code == 200
    listed = steward("serve", "status", *address)
    assert listed.returncode == 0 and spec.name in listed.stdout and "running=1" in listed.stdout.lower()
    stopped = steward("serve", "stop", spec.name, *address)
    assert stopped.returncode == 0, stopped.stderr
    from ray import serve

    wait_for(lambda: spec.name not in serve.status().applications, 60, "the app to be gone")
    missing = steward("serve", "stop", "nothing-here", *address)
    assert missing.returncode == 2 and "no Serve application named 'nothing-here'" in missing.stderr


def test_run_sweeps_registers_and_serves_the_best_trial_with_monitoring(serve_port, tmp_path):
    """One spec from a sweep to a watched endpoint: `steward run` sweeps, keeps the best trial, registers it in
    the run's MLflow registry and deploys it with monitoring."""
    from mlflow import MlflowClient

    from steward.spec import load_job
    from tests.conftest import JOBS
    from tests.test_cli import steward

    overrides = [f"output_dir={tmp_path}", "train.epochs=2", "tune.num_samples=2", "tune.scheduler={name: fifo}"]
    sets = [item for o in overrides for item in ("--set", o)]
    spec = JOBS / "sweep-to-endpoint.yaml"
    out = steward("run", str(spec), *sets, "--address", gcs_address(), "--port", str(serve_port))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    [run_dir] = (tmp_path / "sweep-to-endpoint").iterdir()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["best_trial"]
    version = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version_by_alias(
        "sweep-to-endpoint", "challenger"
    )
    url = f"http://127.0.0.1:{serve_port}/sweep"
    info = requests.get(f"{url}/info").json()
    assert info["run_id"] == run_dir.name and info["registry"]["version"] == str(version.version)
    instances = validation_inputs(load_job(spec, overrides), 40)
    assert requests.post(f"{url}/predict", json={"instances": instances}, timeout=30).ok
    wait_for(lambda: requests.get(f"{url}/monitor").json()["records"] >= 40, 60, "the monitor to count them")
