"""Tracking on MLflow: a run lands in a real `mlflow server` and in the embedded SQLite store, read back with
MlflowClient; a server that is down or a refused call never fails a run. (test_cli's quickstart run checks a real
training run's per-epoch metrics and artifacts; test_tune's CLI sweep its trials as child runs.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests
from mlflow import MlflowClient

from steward.spec import SpecError, load_job, validate_job
from steward.tracking import STORE, TRACKED, Child, Tracker, name, result_metrics, tracking_uri
from tests.conftest import JOBS, free_port
from tests.serving import trained_run, wait_for


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` on loopback with a SQLite store and artifacts of its own."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    argv = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
            "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "art"),
            "--workers", "1"]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "w") as log:
        # a session of its own: the server starts its web workers as children, and they all go with the group
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True, env=env)
        try:
            wait_for(lambda: _answers(url) or process.poll() is not None, 120, "mlflow server to answer")
            assert process.poll() is None, (folder / "server.log").read_text()[-3000:]
            yield url
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=30)


def _answers(url):
    try:
        return requests.get(f"{url}/health", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A succeeded quickstart run folder (trained in-process) and its spec."""
    return trained_run(tmp_path_factory.mktemp("tracked"), "quickstart.yaml", "model.params.channels=[8,16]", epochs=1)


def tracked(run, uri, warnings, kind="train"):
    spec, run_dir = run
    job = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"uri": uri})})
    tracker = Tracker.start(job, run_dir, kind, warnings.append)
    return job, run_dir, tracker


def test_a_run_lands_on_a_real_mlflow_server_with_params_tags_metrics_and_artifacts(run, server):
    warnings = []
    job, run_dir, tracker = tracked(run, server, warnings)
    tracker.finish(run_dir, "succeeded")
    assert warnings == [] and tracker.on
    client = MlflowClient(server)
    logged = client.get_run(tracker.run_id)
    assert logged.info.status == "FINISHED" and logged.info.run_name == run_dir.name
    assert client.get_experiment(logged.info.experiment_id).name == "quickstart"
    assert logged.data.params["model.params.channels"] == "[8, 16]"
    assert logged.data.params["train.optimizer.lr"] == str(job.train.optimizer.lr)
    tags = logged.data.tags
    assert tags["steward.state"] == "succeeded" and tags["steward.kind"] == "train"
    assert tags["steward.run_folder"] == str(run_dir) and len(tags["steward.spec_hash"]) >= 8
    result = json.loads((run_dir / "metrics.json").read_text())
    assert logged.data.metrics["test_accuracy"] == pytest.approx(result["overall"]["accuracy"])
    assert {a.path for a in client.list_artifacts(tracker.run_id)} >= {"spec.yaml", "metrics.json"}


def test_a_run_registers_on_a_real_mlflow_server_and_comes_back_through_its_artifact_proxy(run, server, tmp_path):
    from steward.serve.model import REGISTERED
    from steward.serve.registry import fetch, register

    warnings = []
    job, run_dir, tracker = tracked(run, server, warnings)
    version = register(tracker, job, run_dir)
    tracker.finish(run_dir, "succeeded")
    assert warnings == [] and version is not None and version.aliases == ("challenger",)
    assert MlflowClient(server).get_model_version_by_alias("quickstart", "challenger").run_id == tracker.run_id
    folder = fetch(f"models:/quickstart/{version.version}", server, tmp_path / "fetched")
    assert (folder / "model" / "model.safetensors").read_bytes() == (
        run_dir / "model" / "model.safetensors"
    ).read_bytes()
    (run_dir / TRACKED).unlink()  # the next tests start their own MLflow runs
    (run_dir / REGISTERED).unlink()


def test_a_resumed_run_continues_its_mlflow_run(run, tmp_path):
    store = f"sqlite:///{tmp_path / 'resume.db'}"
    _, run_dir, first = tracked(run, store, [])
    first.finish(run_dir, "interrupted")
    assert MlflowClient(store).get_run(first.run_id).info.status == "KILLED"
    _, _, again = tracked(run, store, [])
    assert again.on and again.run_id == first.run_id  # `on` waits for the MLflow run to be open
    assert MlflowClient(store).get_run(first.run_id).info.status == "RUNNING"
    again.finish(run_dir, "succeeded")
    finished = MlflowClient(store).get_run(first.run_id)
    assert finished.info.status == "FINISHED" and finished.data.tags["steward.state"] == "succeeded"
    (run_dir / TRACKED).unlink()  # the next tests start their own MLflow runs


def test_a_sweeps_trials_are_child_runs_with_their_curves(run, tmp_path):
    store = f"sqlite:///{tmp_path / 'sweep.db'}"
    _, run_dir, parent = tracked(run, store, [], kind="sweep")
    trials = [Child("t1", {"train.optimizer.lr": 0.01}, {"val_accuracy": [(1, 0.5), (2, 0.7)]}),
              Child("t2", {"train.optimizer.lr": 0.1}, {"val_accuracy": [(1, 0.2)]}, {"x": "y"}, "failed")]  # fmt: skip
    parent.log_children(trials)
    parent.finish(run_dir, "succeeded")
    client = MlflowClient(store)
    children = client.search_runs([client.get_run(parent.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.run_id}'")  # fmt: skip
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == {"t1", "t2"}
    assert by_name["t1"].data.params["train.optimizer.lr"] == "0.01" and by_name["t2"].info.status == "FAILED"
    curve = client.get_metric_history(by_name["t1"].info.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in curve] == [(1, 0.5), (2, 0.7)]
    (run_dir / TRACKED).unlink()


def test_a_server_that_is_down_is_one_warning_and_the_run_goes_on(run):
    warnings = []
    started = time.monotonic()
    _, run_dir, tracker = tracked(run, f"http://127.0.0.1:{free_port()}", warnings)
    tracker.finish(run_dir, "succeeded")
    tracker.log_children([Child("t", {})])
    assert not tracker.on and len(warnings) == 1, warnings
    assert "the run goes on without it" in warnings[0] and "Traceback" not in warnings[0]
    assert time.monotonic() - started < 60  # MLflow's own client would retry a dead server for minutes
    assert not (run_dir / TRACKED).exists()


def test_the_embedded_store_lives_in_output_dir_and_tracking_can_be_off(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    job = load_job(JOBS / "quickstart.yaml", [f"output_dir={tmp_path}"])
    assert tracking_uri(job) == f"sqlite:///{tmp_path / STORE}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri(job) == "http://tracker:5000"
    assert tracking_uri(load_job(JOBS / "quickstart.yaml", ["tracking.uri=sqlite:////x.db"])) == "sqlite:////x.db"
    assert tracking_uri(load_job(JOBS / "quickstart.yaml", ["tracking.enabled=false"])) is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking_uri(load_job(JOBS / "quickstart.yaml", ["output_dir=s3://bucket/runs"])) is None


def test_hostile_uris_names_and_values(tmp_path):
    raw = {"name": "q", "data": {"source": "builtin:digits"}, "model": {"family": "cnn"}}
    for uri in ("ftp://x", "http://a b", "; rm -rf /", "http://" + "x" * 3000):
        with pytest.raises(SpecError) as refused:
            validate_job(raw | {"tracking": {"uri": uri}}, "job.yaml", tmp_path)
        assert [p.path for p in refused.value.problems] == ["tracking.uri"], uri
    assert name("a<b>\n=c") == "a_b___c" and len(name("x" * 999)) == 250
    metrics = dict(
        result_metrics({"overall": {"accuracy": 1.0}, "groups": {"g": {"a/b c": {"accuracy": 0.5, "n": "x"}}}})
    )
    assert metrics == {"test_accuracy": 1.0, "test.g.a/b c.accuracy": 0.5}
