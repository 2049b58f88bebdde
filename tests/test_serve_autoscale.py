"""Ray tier: autoscaling on a real Ray Serve behind its HAProxy ingress (the mode `steward serve` picks when haproxy
is installed): 1 -> 2 replicas under load, the new one serving, and back; scale to zero and cold start.
"""

import threading

import numpy as np
import pytest
import requests

from steward.spec.serve import AutoscalingSpec, ServeSpec
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


@pytest.fixture(scope="module", autouse=True)
def _fast_ingress():
    """Serve's HAProxy ingress, as `steward serve` picks it for an autoscaled spec, set before this module's Ray."""
    with serve_mode_as_the_cli_picks_it(ServeSpec(autoscaling=AutoscalingSpec())) as fast:
        assert fast, "ray[serve] ships HAProxy on Linux"
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return {"cnn": trained_run(tmp_path_factory.mktemp("autoscale"), "quickstart.yaml", epochs=2)}


def running_replicas(name):
    from ray import serve

    app = serve.status().applications.get(name)
    if app is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def keep_busy(url, body, stop, threads=8):
    def loop():
        with requests.Session() as session:
            while not stop.is_set():
                session.post(f"{url}/predict", json=body, timeout=60)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    return workers


FAST_AUTOSCALING = {
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 2.0,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1.0,
    "target_ongoing_requests": 1.0,
}


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(runs, serve_port):
    spec, _ = runs["cnn"]
    auto = {"min_replicas": 1, "max_replicas": 2, **FAST_AUTOSCALING}
    url = serve_it(runs, serve_port, "cnn", autoscaling=auto, batching=None, max_ongoing_requests=8)
    assert running_replicas(spec.name) == 1
    stop = threading.Event()
    workers = keep_busy(url, {"instances": validation_inputs(spec, 4)}, stop)
    try:
        wait_for(lambda: running_replicas(spec.name) == 2, 90, "a second replica under load")
        # HAProxy sends the new replica its share of requests, once its reloaded config lists it
        serving: set[str] = set()

        def both_answered():
            serving.add(requests.get(f"{url}/info", timeout=60).json()["replica"]["id"])
            return len(serving) == 2

        wait_for(both_answered, 60, "both replicas answering")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    wait_for(lambda: running_replicas(spec.name) == 1, 90, "scaling back to one replica once idle")


def test_scale_to_zero_and_cold_start(runs, serve_port):
    spec, run_dir = runs["cnn"]
    auto = {"min_replicas": 0, "max_replicas": 1, **FAST_AUTOSCALING}
    url = serve_it(runs, serve_port, "cnn", autoscaling=auto)
    wait_for(lambda: running_replicas(spec.name) == 0, 60, "zero replicas with no traffic")
    instances = validation_inputs(spec, 3)
    cold = post(f"{url}/predict", json={"instances": instances})  # waits while Serve starts a replica
    assert cold.status_code == 200, cold.text
    served = np.array([p["probabilities"] for p in cold.json()["predictions"]])
    np.testing.assert_allclose(served, offline_probabilities(run_dir, spec, instances), atol=1e-5)
    assert running_replicas(spec.name) == 1
    wait_for(lambda: running_replicas(spec.name) == 0, 60, "scaling back to zero once idle")
