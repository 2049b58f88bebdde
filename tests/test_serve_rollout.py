"""Ray tier: progressive delivery on a real Serve deployment. A champion trained on fair labels is live; a challenger
trained on labels biased against group "b" is rolled back automatically during a canary (the reason in the events,
the audit chain and Prometheus, traffic back on the champion); a fair challenger on the same traffic is promoted;
in shadow mode the champion's answers are unchanged while the challenger classifies a mirror of them.

Three runs trained in-process (seconds each) on the synthetic text task; traffic is the test split's texts with
their groups, sent in requests of 10 by one client, each request with its own sticky client id.
"""

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import requests

from steward.data.prepare import _tables
from steward.govern import audit
from steward.serve.deploy import start_rollout, stop
from steward.serve.rollout import find_rollout
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.serving import trained_run, wait_for

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
    (sent time, model_version, probabilities)."""
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
            replies.append((sent, answer["model_version"], probabilities))
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
        # every request sent once the replicas have heard (one interval) is the champion's
        after = send(url, traffic, start=10_000)
        assert {version for _, version, _ in after} == {champion.name}
        assert done["share"] == 0.0
    finally:
        stop("canary-biased", "auto", spec.output_dir)


def find_folder(spec, name):
    (folder,) = (Path(spec.output_dir) / "rollouts" / name).iterdir()
    return folder
