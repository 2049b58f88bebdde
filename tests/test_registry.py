"""The model registry on MLflow: registration with each gate's result, promotion by alias (gates, policy, audit),
archiving, serving a registered version with `steward serve --model models:/...`, and the logged pyfunc model
answering as the endpoint does. (test_cli's quickstart registers through a real training run; test_serve's
`steward run` goes from a sweep to a registered, monitored endpoint.)"""

import json
import os
import signal
import subprocess
import sys

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from steward.errors import StewardError
from steward.govern import audit
from steward.serve import registry
from steward.tracking import Tracker
from tests.conftest import JOBS, free_port
from tests.serving import offline_probabilities, trained_run, validation_inputs, wait_for
from tests.test_cli import steward


def registered(spec, run_dir):
    """The run tracked and registered in its output_dir's embedded store; the version and the store's URI."""
    warnings: list[str] = []
    tracker = Tracker.start(spec, run_dir, "train", warnings.append)
    version = registry.register(tracker, spec, run_dir)
    tracker.finish(run_dir, "succeeded")
    assert warnings == [] and version is not None
    return version, tracker.uri


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """Two quickstart runs registered as versions 1 and 2 of `quickstart` (version 1 promoted to champion)."""
    tmp = tmp_path_factory.mktemp("registry")
    runs = []
    for lr in (3e-3, 1e-3):
        spec, run_dir = trained_run(tmp, "quickstart.yaml", "model.params.channels=[8,16]", epochs=1, lr=lr)
        runs.append((spec, run_dir, *registered(spec, run_dir)))
    return tmp / "runs", runs


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    """fair-text trained without mitigation: its fairness gate fails on the group-biased labels."""
    spec, run_dir = trained_run(tmp_path_factory.mktemp("biased"), "fair-text.yaml", epochs=1)
    assert json.loads((run_dir / "metrics.json").read_text())["fairness_gate"] == "failed"
    return spec, run_dir, *registered(spec, run_dir)


@pytest.fixture
def point_mlflow(monkeypatch):
    """mlflow's global tracking URI for one test: set_tracking_uri also sets $MLFLOW_TRACKING_URI, which every later
    subprocess (a steward CLI) would inherit; both are undone after the test."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(None)


def models(output_dir, *args):
    return steward("models", *args, "--output-dir", str(output_dir))


def test_a_registered_version_carries_its_gates_card_and_challenger_alias(digits):
    output_dir, [(spec, run_dir, first, uri), (_, second_dir, second, _)] = digits
    assert (first.version, second.version) == ("1", "2")
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("quickstart", "challenger").version) == "2"  # the newest passing one
    assert first.gates == {"fairness": "not_used", "int8": "not_used", "policy": "passed"} and not first.failed
    assert first.tags["steward.run_id"] == run_dir.name and first.run_id
    info = json.loads((second_dir / "registry.json").read_text())
    assert info["name"] == "quickstart" and info["version"] == "2" and info["aliases"] == ["challenger"]
    listed = models(output_dir, "list")
    assert listed.returncode == 0 and "quickstart" in listed.stdout and "challenger" in listed.stdout


def test_a_version_that_failed_its_fairness_gate_is_recorded_and_can_never_be_champion(biased):
    spec, run_dir, version, uri = biased
    assert version.gates["fairness"] == "failed" and version.aliases == ()
    output_dir = run_dir.parent.parent
    refused = models(output_dir, "promote", spec.name, version.version)
    assert refused.returncode == 2 and "failed its gates (fairness gate failed)" in refused.stderr
    assert "Traceback" not in refused.stderr
    client = MlflowClient(uri)
    assert client.get_registered_model(spec.name).aliases == {}
    [event] = [e for e in audit.events(audit.log_path(output_dir)) if e["event"] == "model.promotion_refused"]
    assert event["model"] == spec.name and event["alias"] == "champion"


def test_promotion_checks_the_policy_and_is_audited_and_archive_takes_the_aliases_off(digits, tmp_path):
    output_dir, [(spec, *_), *_] = digits
    strict = tmp_path / "policy.yaml"
    strict.write_text("name: strict\nrules: {max_workers: 1}\n")  # the quickstart trains on 2
    refused = models(output_dir, "promote", "quickstart", "1", "--policy", str(strict))
    assert refused.returncode == 2 and "max_workers" in refused.stderr
    promoted = models(output_dir, "promote", "quickstart", "1")
    assert promoted.returncode == 0, promoted.stderr
    shown = models(output_dir, "show", "quickstart", "@champion")
    assert "models:/quickstart/1" in shown.stdout and "steward.gate.fairness: not_used" in shown.stdout
    log = audit.log_path(output_dir)
    assert [e["version"] for e in audit.events(log) if e["event"] == "model.promoted"] == ["1"]
    assert audit.verify(log).ok
    archived = models(output_dir, "archive", "quickstart", "2")
    assert archived.returncode == 0 and "archived models:/quickstart/2" in archived.stdout
    client = registry.open_registry(registry.default_uri(output_dir))
    assert registry.get(client, "quickstart", "2").aliases == () and registry.get(client, "quickstart", "2").archived
    again = models(output_dir, "promote", "quickstart", "2")
    assert again.returncode == 2 and "archived" in again.stderr


def test_a_run_left_unregistered_is_registered_afterwards_and_only_once(tmp_path):
    # tracking off at training, or a run cut short between its success and its registration
    spec, run_dir = trained_run(tmp_path, "quickstart.yaml", "model.params.channels=[4]", "tracking.enabled=false",
                                epochs=1)  # fmt: skip
    assert not (run_dir / "registry.json").exists()
    first = steward("models", "register", str(run_dir))
    assert first.returncode == 0 and "models:/quickstart/1 (challenger)" in first.stdout, first.stderr
    again = steward("models", "register", str(run_dir))
    assert again.returncode == 2 and "already registered" in again.stderr
    not_a_run = steward("models", "register", str(tmp_path))
    assert not_a_run.returncode == 2 and "not a succeeded run folder" in not_a_run.stderr


def test_bad_names_refs_and_uris_are_refused_naming_the_part(digits, tmp_path):
    output_dir, _ = digits
    assert models(tmp_path / "nowhere", "list").returncode == 2
    assert not (tmp_path / "nowhere").exists()  # a typo never makes an empty registry
    for args, words in [
        (("show", "quickstart", "99"), "not in the registry"),
        (("show", "quickstart", "@nope"), "not in the registry"),
        (("show", "../etc", "1"), "model name"),
        (("promote", "quickstart", "1", "--alias", "latest"), "--alias"),
    ]:
        out = models(output_dir, *args)
        assert out.returncode == 2 and words in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    for uri in ("models:/../x@champion", "runs:/abc/model", "models:/quickstart", "models:/quickstart@a/b"):
        with pytest.raises(registry.RegistryError, match="--model"):
            registry.fetch(uri, registry.default_uri(output_dir), tmp_path / "fetched")


def test_a_tampered_version_is_refused_before_it_is_served(tmp_path):
    spec, run_dir = trained_run(tmp_path, "quickstart.yaml", "model.params.channels=[4]", epochs=1)
    version, uri = registered(spec, run_dir)
    [stored] = (tmp_path / "runs" / "mlartifacts" / version.run_id).glob("artifacts/model/artifacts/run/spec.yaml")
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{k}: &{k} [{', '.join(['*' + chr(ord(k) - 1)] * 9)}]\n" for k in "bcdefghij"
    )
    stored.write_text(bomb)  # someone with write access to the artifact store
    with pytest.raises(StewardError, match="not a run's spec"):
        registry.fetch("models:/quickstart/1", uri, tmp_path / "fetched")
    assert not (tmp_path / "fetched" / "quickstart" / "1").exists()


def test_the_pyfunc_model_answers_as_the_served_model_does_for_images_and_texts(digits, biased, point_mlflow):
    output_dir, [(spec, run_dir, version, uri), *_] = digits
    point_mlflow(uri)
    model = mlflow.pyfunc.load_model(f"models:/quickstart/{version.version}")
    instances = validation_inputs(spec, 8)
    expected = offline_probabilities(run_dir, spec, instances)
    for given in (instances, np.asarray(instances), pd.DataFrame({"instances": list(np.asarray(instances))})):
        answered = model.predict(given)
        np.testing.assert_allclose(np.stack(answered["probabilities"]), expected, rtol=1e-5, atol=1e-6)
        assert list(answered["class_id"]) == list(expected.argmax(axis=1))
    text_spec, text_dir, text_version, text_uri = biased
    point_mlflow(text_uri)
    texts = validation_inputs(text_spec, 4)
    answered = mlflow.pyfunc.load_model(f"models:/{text_spec.name}/{text_version.version}").predict(texts)
    np.testing.assert_allclose(np.stack(answered["probabilities"]), offline_probabilities(text_dir, text_spec, texts),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


@pytest.mark.slow
def test_steward_serve_serves_the_champion_from_the_registry_as_pyfunc_predicts(digits, point_mlflow):
    output_dir, [(spec, run_dir, version, uri), *_] = digits
    client = MlflowClient(uri)
    client.set_registered_model_alias("quickstart", "champion", version.version)
    port = free_port()
    sets = [f"output_dir={output_dir}", "serve.autoscaling=null", "serve.route_prefix=/reg"]
    argv = [sys.executable, "-m", "steward", "serve", str(JOBS / "quickstart.yaml"), "--model",
            "models:/quickstart@champion", "--port", str(port), *(x for s in sets for x in ("--set", s))]  # fmt: skip
    # the embedded Ray and the spec's own registry, whatever this process points at
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    server = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}/reg"
    try:
        wait_for(lambda: _up(url) or server.poll() is not None, 180, "the registered model to serve")
        assert server.poll() is None, server.stdout.read()[-3000:]
        info = requests.get(f"{url}/info", timeout=10).json()
        assert info["registry"]["name"] == "quickstart" and info["registry"]["version"] == version.version
        assert "champion" in info["registry"]["aliases"]
        instances = validation_inputs(spec, 6)
        served = requests.post(f"{url}/predict", json={"instances": instances}, timeout=30).json()
        point_mlflow(uri)
        scored = mlflow.pyfunc.load_model("models:/quickstart@champion").predict(instances)
        assert [p["label"] for p in served["predictions"]] == list(scored["label"])
        served_p = np.array([p["probabilities"] for p in served["predictions"]])
        np.testing.assert_allclose(served_p, np.stack(scored["probabilities"]), rtol=1e-5, atol=1e-6)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    fetched = output_dir / "registry" / "quickstart" / version.version
    assert (fetched / "model" / "model.json").exists() and (fetched / "registry.json").exists()


def _up(url):
    try:
        return requests.get(f"{url}/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def test_a_rayservice_can_serve_a_registered_version_from_the_clusters_mlflow_server():
    import yaml

    from steward.cluster.k8s import manifests
    from steward.errors import StewardError
    from steward.spec import load_job

    job = load_job(JOBS / "quickstart.yaml", ["tracking.uri=http://mlflow.mlops:5000"])
    [service] = manifests(job, "rayservice", model="models:/quickstart@champion")
    [app] = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["args"]["model"] == "models:/quickstart@champion" and "run_dir" not in app["args"]
    with pytest.raises(StewardError, match="tracking.uri"):  # the pods could not reach a SQLite file of this machine
        manifests(load_job(JOBS / "quickstart.yaml"), "rayservice", model="models:/quickstart@champion")
    with pytest.raises(StewardError, match="--model"):
        manifests(job, "rayservice", model="models:/quickstart@champion; rm -rf /")


def test_a_language_model_registers_but_its_pyfunc_model_says_to_serve_it(tmp_path, point_mlflow):
    spec, run_dir = trained_run(tmp_path, "tiny-gpt.yaml", "data.options.num_samples=200", epochs=1)
    version, uri = registered(spec, run_dir)
    assert version.gates["fairness"] == "not_used" and "challenger" in version.aliases
    point_mlflow(uri)
    with pytest.raises(Exception, match="steward serve"):
        mlflow.pyfunc.load_model(f"models:/{spec.name}/{version.version}")
