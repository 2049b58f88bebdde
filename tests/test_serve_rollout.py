"""Ray tier: progressive delivery on a real Serve deployment. A champion trained on fair labels is live; a challenger
trained on labels biased against group "b" is rolled back automatically during a canary (the reason in the events,
the audit chain and Prometheus, traffic back on the champion); a fair challenger on the same traffic is promoted;
in shadow mode the champion's answers are unchanged while the challenger classifies a mirror of them.

Three runs trained in-process (seconds each) on the synthetic text task; traffic is the test split's texts with
their groups, sent in requests of 10 by one client, each request with its own sticky client id.
"""

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import ray
import requests

from steward.data.prepare import _tables
from steward.govern import audit
from steward.serve.deploy import start_rollout, stop
from steward.serve.rollout import find_rollout
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.serving import offline_probabilities, trained_run, wait_for
from tests.test_registry import registered

pytestmark = pytest.mark.slow

WINDOW = 200
DATA = ["data.options.num_samples=2000", "evaluate.fairness.thresholds={}"]
BIAS = {
    "group": "group",
    "favourable": "1",
    "privileged": "a",
    "metrics": ["statistical_parity_difference"],
    "thresholds": {"statistical_parity_difference": [-0.2, 0.2]},
    "min_records_per_group": 20,
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The fair champion, a fair challenger (another seed) and one trained on labels biased against group b."""
    root = tmp_path_factory.mktemp("rollout")
    fair = [*DATA, "data.options.bias=0.0"]
    return {
        "champion": trained_run(root, "fair-text.yaml", *fair),
        "fair": trained_run(root, "fair-text.yaml", *fair, "seed=1"),
        "biased": trained_run(root, "fair-text.yaml", *DATA),
    }


@pytest.fixture(scope="module")
def traffic(runs):
    spec, _ = runs["champion"]
    columns, tables = _tables(spec, roles=["test"])
    test = tables["test"]
    return list(test[columns.input]), [str(g) for g in test["group"]]


def rollout_spec(spec, name, port, **rollout):
    cfg = ServeSpec.model_validate(
        {
            "name": name,
            "route_prefix": f"/{name}",
            "num_cpus": 0.5,
            "rollout": {"min_records": WINDOW, "interval_s": 0.5, **rollout},
        }
    )
    monitor = MonitorSpec.model_validate({"bias": BIAS, "window": {"size": WINDOW}, "push_interval_s": 0.5})
    return spec.model_copy(update={"serve": cfg, "monitor": monitor})


def send(url, traffic, rounds=1, start=0):
    """Every text of `traffic` `rounds` times, 10 a request, each request its own client id; returns per request
    (sent time, model_version, probabilities, request ids)."""
    texts, groups = traffic
    replies = []
    for r in range(rounds):
        for i in range(0, len(texts), 10):
            body = {"instances": texts[i : i + 10], "attributes": {"group": groups[i : i + 10]}}
            sent = time.time()
            client = {"x-client-id": f"client-{start + r * len(texts) + i}"}
            reply = requests.post(f"{url}/predict", json=body, headers=client, timeout=60)
            assert reply.status_code == 200, reply.text
            answer = reply.json()
            probabilities = [p["probabilities"] for p in answer["predictions"]]
            ids = [p["request_id"] for p in answer["predictions"]]
            replies.append((sent, answer["model_version"], probabilities, ids))
    return replies


def status(name):
    return ray.get(find_rollout(name).status.remote())


def scraped(metric, **labels):
    port = ray.nodes()[0]["MetricsExportPort"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    wanted = "".join(f'(?=[^}}]*{k}="{re.escape(v)}")' for k, v in labels.items())
    found = re.search(rf"^ray_{metric}\{{{wanted}[^}}]*\}} (\S+)$", text, re.M)
    return float(found[1]) if found else None


def test_a_challenger_biased_against_a_group_is_rolled_back_during_a_canary(runs, traffic, ray_local, serve_port):
    spec, champion = runs["champion"]
    _, biased = runs["biased"]
    job = rollout_spec(spec, "canary-biased", serve_port, mode="canary", steps=[0.5])
    url = start_rollout(job, champion, biased, port=serve_port).url
    try:
        send(url, traffic, rounds=3)
        done = wait_for(lambda: (s := status("canary-biased"))["state"] != "running" and s, 60, "a decision")
        assert done["state"] == "rolled_back", done["decisions"]
        decision = done["decisions"][-1]
        gate = next(g for g in decision["failed"] if g["gate"] == "bias:statistical_parity_difference")
        assert gate["arm"] == "challenger" and gate["value"] < -0.2 and gate["detail"]["bounds"] == [-0.2, 0.2]
        rates = gate["detail"]["selection_rates"]
        assert rates["b"] < rates["a"] - 0.2, rates  # the group it is biased against, by name and value
        events = [json.loads(line) for line in (find_folder(spec, "canary-biased") / "events.jsonl").open()]
        assert [e["decision"] for e in events] == ["started", "rolled_back"]
        audited = audit.history(audit.log_path(spec.output_dir), deployment="canary-biased")
        rolled = [e for e in audited if e["event"] == "rollout.rolled_back"]
        assert rolled and rolled[0]["failed"][0]["arm"] == "challenger" and rolled[0]["challenger"] == str(biased)
        assert audit.verify(audit.log_path(spec.output_dir)).ok
        assert wait_for(lambda: scraped("steward_rollout_state", state="rolled_back"), 30, "the state in Prometheus")
        failing = scraped("steward_rollout_gate_failing", gate="bias:statistical_parity_difference")
        assert failing == 1.0
        # traffic is back on the champion within one window of the decision: the replica hears within an interval
        after = send(url, traffic, rounds=2, start=10_000)
        late = sum(len(probabilities) for _, version, probabilities, _ in after if version == biased.name)
        assert late < WINDOW and {version for _, version, *_ in after[-10:]} == {champion.name}, late
        assert done["share"] == 0.0
        report = steward_cli("rollout", "report", "canary-biased", "--output-dir", spec.output_dir)
        assert report.returncode == 0, report.stderr
        page = (find_folder(spec, "canary-biased") / "report.html").read_text()
        assert "rolled_back" in page and "statistical_parity_difference" in page
    finally:
        stop("canary-biased", "auto", spec.output_dir)


def find_folder(spec, name):
    (folder,) = (Path(spec.output_dir) / "rollouts" / name).iterdir()
    return folder


def send_until(url, traffic, condition, what, rounds=20):
    """Rounds of traffic until `condition()` holds; returns the replies."""
    replies = []
    for r in range(rounds):
        replies += send(url, traffic, start=r * 1000)
        if condition():
            return replies
    raise AssertionError(f"{what} after {rounds} rounds of traffic: {status_of_any()}")


def status_of_any():
    return {name: status(name)["decisions"] for name in ("canary-fair", "shadow") if find_rollout(name)}


def test_a_fair_challenger_steps_up_survives_a_rollout_actor_crash_and_is_promoted(
    runs, traffic, ray_local, serve_port, tmp_path
):
    spec, champion = runs["champion"]
    _, fair = runs["fair"]
    job = rollout_spec(spec, "canary-fair", serve_port, mode="canary", steps=[0.25, 0.5])
    spec_file = tmp_path / "canary-fair.yaml"
    spec_file.write_text(json.dumps(job.model_dump(mode="json")))
    started = steward_cli(
        *("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", str(fair)),
        *("--address", own(), "--port", str(serve_port)),
    )
    assert started.returncode == 0 and "steward rollout status canary-fair" in started.stdout, started.stderr
    url = f"http://127.0.0.1:{serve_port}/canary-fair"
    try:
        send_until(url, traffic, lambda: status("canary-fair")["step"] == 1, "the second step")
        # The rollout actor dies mid-rollout: Ray restarts it and it resumes from its saved state, in the same step.
        actor = find_rollout("canary-fair")
        pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
        ray.kill(actor, no_restart=False)
        back = wait_for(lambda: _alive_with_new_pid("canary-fair", pid), 60, "the rollout actor restarted")
        assert back["state"] == "running" and back["step"] == 1 and back["share"] == 0.5
        assert [d["decision"] for d in back["decisions"]] == ["started", "step"]
        replies = send_until(url, traffic, lambda: status("canary-fair")["state"] != "running", "a decision")
        done = status("canary-fair")
        assert done["state"] == "promoted", done["decisions"]
        assert [d["decision"] for d in done["decisions"]] == ["started", "step", "promoted"]
        assert {version for _, version, *_ in replies} == {champion.name, fair.name}  # both arms answered
        # a late label reaches the monitor of the arm that answered; an id neither issued is refused
        for arm in (champion, fair):
            request_id = next(ids[0] for _, version, _, ids in replies if version == arm.name)
            label = requests.post(f"{url}/feedback", json={"request_id": request_id, "label": "1"}, timeout=30)
            assert label.status_code == 200 and label.json()["status"] in ("matched", "waiting"), label.text
        made_up = requests.post(f"{url}/feedback", json={"request_id": "0" * 48, "label": "1"}, timeout=30)
        assert made_up.status_code == 404 and made_up.json()["field"] == "request_id"
        audited = audit.history(audit.log_path(spec.output_dir), deployment="canary-fair")
        assert [e["event"] for e in audited if e["event"].startswith("rollout.")] == [
            "rollout.started",
            "rollout.step",
            "rollout.promoted",
        ]
        # promoted: every request is the challenger's once the replica has heard (within one sync interval)
        heard(url, "promoted")
        assert {version for _, version, *_ in send(url, traffic, start=50_000)} == {fair.name}
    finally:
        stop("canary-fair", "auto", spec.output_dir)


def heard(url, state):
    """Wait until the replica follows the rollout's `state` (its /info shows the routing it has heard)."""
    wait_for(lambda: requests.get(f"{url}/info", timeout=30).json()["rollout"]["state"] == state, 10, state)


def _alive_with_new_pid(name, old_pid):
    try:
        actor = find_rollout(name)
        pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()), timeout=5)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError, AttributeError):
        return None
    return pid != old_pid and status(name)


def own():
    """This test's Ray cluster's address: `auto` could find another test worker's cluster on this machine."""
    return ray.get_runtime_context().gcs_address


def steward_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "steward", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_in_shadow_mode_the_champion_answers_unchanged_and_promotion_waits_for_the_policy(
    runs, traffic, ray_local, serve_port, tmp_path
):
    spec, champion = runs["champion"]
    _, fair = runs["fair"]
    policy = tmp_path / "policy.yaml"
    policy.write_text("name: only-acme-data\nrules: {allowed_sources: ['hf:acme/']}\n")
    job = rollout_spec(spec, "shadow", serve_port, mode="shadow", steps=[1.0], auto_promote=False)
    url = start_rollout(job, champion, fair, port=serve_port, policy=str(policy)).url
    try:
        texts, groups = traffic
        replies = send_until(url, traffic, lambda: status("shadow")["decisions"][-1]["decision"] != "started", "gates")
        held = status("shadow")
        assert held["state"] == "running" and held["arms"]["challenger"]["mirrored"] > 0, held
        # every answer is the champion's, as it answers alone
        assert {version for _, version, *_ in replies} == {champion.name}
        expected = offline_probabilities(champion, spec, texts)
        for k, (_, _, probabilities, _) in enumerate(replies[: len(texts) // 10]):
            np.testing.assert_allclose(probabilities, expected[10 * k : 10 * k + 10], atol=1e-5)
        monitor = requests.get(f"{url}/monitor", timeout=30).json()
        assert monitor["arm"] == "champion" and monitor["arms"]["challenger"]["records"] > 0
        assert monitor["rollout"]["mode"] == "shadow" and monitor["rollout"]["arms"]["challenger"]["agreement"] > 0.5
        # the last step passed and auto_promote is off: promotion is the user's, and the policy refuses this run
        refused = steward_cli("rollout", "promote", "shadow", "--reason", "gates passed", "--address", own())
        assert refused.returncode == 2 and "allowed_sources" in refused.stderr, refused.stderr
        assert status("shadow")["state"] == "running"
        policy.write_text("name: any-data\nrules: {}\n")
        promoted = steward_cli("rollout", "promote", "shadow", "--reason", "gates passed", "--address", own())
        assert promoted.returncode == 0 and "promoted" in promoted.stdout, promoted.stderr
        shown = steward_cli("rollout", "status", "shadow", "--address", own(), "--json")
        assert json.loads(shown.stdout)["state"] == "promoted"
        aborted = steward_cli("rollout", "abort", "shadow", "--reason", "back to the champion", "--address", own())
        assert aborted.returncode == 0 and status("shadow")["state"] == "aborted"
        heard(url, "aborted")
        assert {version for _, version, *_ in send(url, traffic, start=70_000)} == {champion.name}
    finally:
        stop("shadow", "auto", spec.output_dir)


def test_bad_rollouts_are_refused_before_anything_is_deployed(runs, ray_local, tmp_path):
    spec, champion = runs["champion"]
    _, fair = runs["fair"]
    spec_file = tmp_path / "spec.yaml"
    job = rollout_spec(spec, "refused", 8000, mode="canary")
    spec_file.write_text(json.dumps(job.model_dump(mode="json")))
    same = steward_cli("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", str(champion))
    assert same.returncode == 2 and "is the champion's run" in same.stderr, same.stderr
    missing = steward_cli("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", "/nowhere")
    assert missing.returncode == 2 and "--challenger /nowhere: not a finished run folder" in missing.stderr
    assert "Traceback" not in same.stderr + missing.stderr
    no_section = json.loads(spec_file.read_text())
    no_section["serve"]["rollout"] = None
    spec_file.write_text(json.dumps(no_section))
    plain = steward_cli("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", str(fair))
    assert plain.returncode == 2 and "serve.rollout" in plain.stderr, plain.stderr
    nobody = steward_cli("rollout", "status", "no-such-deployment", "--address", own())
    assert nobody.returncode == 2 and "no rollout" in nobody.stderr
    # a registered version as the challenger: fetched from the spec's registry before the spec's section is checked
    version, _ = registered(spec, fair)
    uri = f"models:/{spec.name}/{version.version}"
    from_registry = steward_cli("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", uri)
    assert from_registry.returncode == 2 and "serve.rollout" in from_registry.stderr, from_registry.stderr
    assert (Path(spec.output_dir) / "registry" / spec.name / str(version.version) / "model").is_dir()
    unknown = steward_cli("rollout", "start", str(spec_file), "--run", str(champion), "--challenger", uri + "9")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr and f"{version.version}9" in unknown.stderr
