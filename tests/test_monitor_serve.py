"""End to end: monitored Serve deployments under real HTTP traffic: drift and bias alerts on /monitor, in Prometheus
and at a webhook, and how many records a killed replica or monitor loses."""

import json
import os
import re
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
import requests

from steward.govern import audit
from steward.monitor.process import NICE
from steward.serve.deploy import deploy
from steward.spec.monitor import MonitorSpec
from steward.spec.serve import ServeSpec
from tests.conftest import JOBS, ROOT, free_port, own_processes
from tests.serving import trained_run, wait_for

pytestmark = pytest.mark.slow
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def ports():
    """A local Ray exporting metrics every second on a known port, and Serve on another."""
    import ray
    from ray import serve

    metrics = free_port()
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=metrics,
        _system_config={"metrics_report_interval_ms": 1000},
    )
    http = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": http})
    yield {"metrics": metrics, "http": http}
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(autouse=True)
def _delete_apps(ports):
    """Each test's deployment is deleted after it, so its replicas' CPUs are free for the next test's."""
    from ray import serve

    yield
    for name in serve.status().applications:
        serve.delete(name, _blocking=False)


@pytest.fixture(scope="module")
def webhook():
    """A real HTTP receiver: every JSON body POSTed to it lands in the returned list."""
    received: list[dict] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/hook", received
    server.shutdown()


def monitored(tmp_path, ports, job, monitor, *overrides, prefix, replicas=1, **serve):
    spec, run_dir = trained_run(tmp_path, job, *overrides)
    serve_cfg = ServeSpec(route_prefix=prefix, num_cpus=0.5, num_replicas=replicas, name=prefix.strip("/"), **serve)
    job_spec = spec.model_copy(update={"serve": serve_cfg, "monitor": MonitorSpec.model_validate(monitor)})
    return spec, run_dir, deploy(job_spec, run_dir, port=ports["http"]).url


def send(url, instances, groups=None):
    """POST instances in requests of 20; returns the request ids answered."""
    ids = []
    for i in range(0, len(instances), 20):
        body = {"instances": instances[i : i + 20]}
        if groups is not None:
            body["attributes"] = {"group": groups[i : i + 20]}
        reply = requests.post(f"{url}/predict", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        ids += [p["request_id"] for p in reply.json()["predictions"]]
    return ids


def check_feedback(url, ids):
    """One label per prediction this deployment made, within monitor.feedback_rate (10 here); every refusal is a
    4xx naming the part, and counted."""

    def label(request_id, value="1", **kwargs):
        return requests.post(f"{url}/feedback", json={"request_id": request_id, "label": value}, timeout=30, **kwargs)

    accepted = label(ids[0])
    assert accepted.status_code == 200 and accepted.json()["request_id"] == ids[0], accepted.text
    assert accepted.json()["status"] == "matched"  # pushed already: the monitor holds its prediction
    refused = {
        "duplicate": (label(ids[0], "0"), 409, "request_id"),
        "label": (label(ids[1], "no-such-class"), 422, "label"),
        "unknown": (label("0" * 48), 404, "request_id"),  # shaped like an id, not issued: labels sent ahead too
        "forged": (label(ids[2][:-1] + ("0" if ids[2][-1] != "0" else "1")), 404, "request_id"),
        "malformed": (requests.post(f"{url}/feedback", data=b"x" * 5000, timeout=30), 413, "body"),
    }
    for name, (reply, status, field) in refused.items():
        assert (reply.status_code, reply.json()["field"]) == (status, field), (name, reply.text)
    burst = [label(ids[3 + i]) for i in range(30)]
    limited = [reply for reply in burst if reply.status_code == 429]
    assert limited and all(int(r.headers["Retry-After"]) >= 1 for r in limited), [r.status_code for r in burst]
    assert {r.status_code for r in burst} == {200, 429}
    counted = requests.get(f"{url}/info", timeout=30).json()["replica"]["labels_refused"]
    assert counted == {"duplicate": 1, "label": 1, "unknown": 2, "malformed": 1, "rate": len(limited)}, counted


def report(url):
    reply = requests.get(f"{url}/monitor", timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()


def windows_closed(url, count):
    return wait_for(lambda: (r := report(url))["windows_closed"] >= count and r, 60, f"{count} closed windows")


def alerts_of(url, kind):
    """Wait for an open alert of this kind; on time-out, say what the recent windows judged."""
    try:
        return wait_for(lambda: [a for a in report(url)["alerts"] if a["kind"] == kind], 60, f"a {kind} alert")
    except AssertionError:
        recent = report(url)["recent"]
        raise AssertionError([[(c["name"], c["value"], c["status"]) for c in w["checks"]] for w in recent]) from None


def digits(spec):
    """Every validation and test image as a client sends it, and its label (traffic like the reference's)."""
    from steward.data.prepare import _tables

    columns, tables = _tables(spec)
    rows = [
        (x, y)
        for role in ("validation", "test")
        for x, y in zip(tables[role][columns.input], tables[role][columns.label], strict=True)
    ]
    return [np.asarray(x, dtype=float) for x, _ in rows], [str(y) for _, y in rows]


def test_digits_clean_traffic_is_quiet_noise_raises_drift_and_skew_raises_bias(tmp_path, ports, webhook):
    hook, received = webhook
    # SPD only: disparate impact of a 10%-rate class swings by +-50% on 100 records a group, by chance alone.
    bias = {"group": "group", "favourable": "0", "privileged": "a", "metrics": ["statistical_parity_difference"]}
    alerts = {"consecutive_windows": 2, "webhook": hook}
    monitor = {
        "bias": bias,
        "drift": {"min_records": 100},
        "window": {"size": 200},
        "alerts": alerts,
        "push_interval_s": 0.3,
        "persist_interval_s": 2,
    }
    spec, run_dir, url = monitored(tmp_path, ports, "quickstart.yaml", monitor, prefix="/watched")
    images, labels = digits(spec)

    # 1. Traffic like the validation split, groups at random: closed windows, no alert.
    assert report(url)["records"] == 0  # the monitor actor, started with the replica, is up
    clean = [images[i].tolist() for i in RNG.integers(0, len(images), 1000)]
    send(url, clean, RNG.choice(["a", "b"], 1000).tolist())
    first = windows_closed(url, 4)
    assert first["alerts"] == [] and received == [], (
        first["alerts"],
        [c for w in first["recent"] for c in w["checks"] if c["status"] == "fail"],
    )
    # The replica pushes when it holds its share of the open window: a window overshoots by less than a request.
    sizes = [w["records"] for w in first["recent"]]
    assert all(200 <= n < 220 for n in sizes), sizes
    statuses = {c["name"]: c["status"] for c in first["recent"][-1]["checks"]}
    assert {
        "psi:prediction.class",
        "chi2:prediction.class",
        "psi:prediction.confidence",
        "mmd:embedding",
        "statistical_parity_difference",
    } <= set(statuses)

    # 2. Noisy images: drift alerts on /monitor, at the webhook and in Prometheus.
    noisy = [
        np.clip(images[i] + RNG.normal(0, 6, images[i].shape), 0, 16).tolist()
        for i in RNG.integers(0, len(images), 400)
    ]
    send(url, noisy, RNG.choice(["a", "b"], 400).tolist())
    alerts = alerts_of(url, "drift")
    assert {"mmd:embedding"} <= {a["name"] for a in alerts}
    wait_for(lambda: any(e["event"] == "alert" and e["kind"] == "drift" for e in received), 30, "the webhook call")

    def logged():  # a window's alerts are written one after another: the MMD one may come after another's
        lines = (run_dir / "monitor" / "watched" / "events.jsonl").read_text().splitlines()
        audited = audit.history(audit.log_path(run_dir.parent.parent), deployment="watched")
        return any(e["name"] == "mmd:embedding" and e["event"] == "alert" for e in map(json.loads, lines)) and any(
            e["event"] == "monitor.alert.raised" and e["name"] == "mmd:embedding" for e in audited
        )

    wait_for(logged, 30, "the MMD alert in events.jsonl and the audit log")
    metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    scraped = wait_for(
        lambda: (t := urllib.request.urlopen(metrics_url).read().decode()) and "ray_steward_monitor_alerts" in t and t,
        60,
        "Prometheus metrics",
    )
    assert (
        'signal="embedding"' in scraped and "ray_steward_monitor_drift" in scraped and 'deployment="watched"' in scraped
    )

    # 3. Clean images, but group a is shown only zeros: the favourable rate splits by group.
    zeros = [i for i, y in enumerate(labels) if y == "0"]
    others = [i for i, y in enumerate(labels) if y != "0"]
    skewed = [images[i].tolist() for i in RNG.choice(zeros, 200)] + [
        images[i].tolist() for i in RNG.choice(others, 200)
    ]
    order = RNG.permutation(400)
    groups = ["a"] * 200 + ["b"] * 200
    send(url, [skewed[i] for i in order], [groups[i] for i in order])
    alerts = alerts_of(url, "bias")
    assert alerts[0]["name"] == "statistical_parity_difference" and alerts[0]["value"] < -0.5

    # Every metric the shipped dashboard and alert rules query is one this deployment exports.
    used = set()
    for shipped in ("prometheus-alerts.yaml", "grafana-monitor.json"):
        used |= set(re.findall(r"ray_steward_monitor_\w+", (ROOT / "serve" / shipped).read_text()))
    assert len(used) == 8, used
    used.remove("ray_steward_monitor_invalid_rate")  # set once a window has refused records: the poisoned test's
    used.remove("ray_steward_monitor_performance")  # set once late labels arrive: the late-labels test's

    def exported():
        text = urllib.request.urlopen(metrics_url).read().decode()
        return used <= set(re.findall(r"^(ray_steward_monitor_\w+)\{", text, re.M)) and text

    wait_for(exported, 60, f"all of {sorted(used)} on the metrics endpoint")

    # 4. The monitor dies: Ray restarts it from its saves with its open alerts, and their gauges are back at 1 in
    # Prometheus, so the shipped StewardMonitorAlert rule stays firing.
    import ray

    from steward.monitor.actor import NAMESPACE, actor_name

    open_before = {a["name"] for a in report(url)["alerts"]}
    ray.kill(ray.get_actor(actor_name("watched", run_dir), namespace=NAMESPACE), no_restart=False)
    wait_for(lambda: {a["name"] for a in report(url)["alerts"]} == open_before, 60, "the restarted monitor's alerts")

    def alert_gauges():
        text = urllib.request.urlopen(metrics_url).read().decode()
        series = re.findall(r"^ray_steward_monitor_alert_open\{([^}]*)\} (\S+)$", text, re.M)
        watched = [tags for tags, value in series if 'deployment="watched"' in tags and float(value) == 1]
        open_now = {re.search(r'check="([^"]*)"', tags)[1] for tags in watched}
        return open_before <= open_now and open_now

    wait_for(alert_gauges, 60, f"alert_open = 1 for {sorted(open_before)} after the restart")


def test_late_labels_give_accuracy_recall_f1_and_equalized_odds_per_group_over_windows(tmp_path, ports):
    """Predictions for two groups, then their labels through POST /feedback, some wrong for group b only: the
    window the labels arrive in reports each group's accuracy, macro recall and macro F1 and the equalized odds
    difference computed from the labels sent, judges them, and exports them to Prometheus."""
    from sklearn.metrics import accuracy_score, f1_score, recall_score

    from steward.monitor.bias import equalized_odds_difference

    bias = {"group": "group", "favourable": "0", "metrics": ["equalized_odds_difference"], "min_records_per_group": 20}
    performance = {"min_accuracy": 0.8, "min_labels": 20}
    monitor = {"bias": bias, "performance": performance, "window": {"size": 120}, "push_interval_s": 0.3}
    spec, _, url = monitored(tmp_path, ports, "quickstart.yaml", {**monitor, "feedback_rate": 1000}, prefix="/labelled")
    images, labels = digits(spec)
    rng = np.random.default_rng(2)  # its own: the other tests' draws stay as they were
    rows = rng.choice(len(images), 120, replace=False)
    groups = ["a", "b"] * 60
    predicted, ids = [], []
    for i in range(0, 120, 20):
        body = {
            "instances": [images[r].tolist() for r in rows[i : i + 20]],
            "attributes": {"group": groups[i : i + 20]},
        }
        reply = requests.post(f"{url}/predict", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        predicted += [p["label"] for p in reply.json()["predictions"]]
        ids += [p["request_id"] for p in reply.json()["predictions"]]
    windows_closed(url, 1)  # the predictions' window: the labels count in the next one
    # group b's label is wrong for every other record of it (k % 4 == 1): its true class moved on by one
    sent = [str((int(labels[r]) + (k % 4 == 1)) % 10) for k, r in enumerate(rows)]
    for request_id, label in zip(ids, sent, strict=True):
        reply = requests.post(f"{url}/feedback", json={"request_id": request_id, "label": label}, timeout=30)
        assert reply.status_code == 200 and reply.json()["matched"], reply.text
    send(url, [images[r].tolist() for r in rows], groups)  # fills, and closes, the labels' window
    window = windows_closed(url, 2)["recent"][1]

    def expected(group):
        chosen = [k for k, g in enumerate(groups) if group in (None, g)]
        y, p = [sent[k] for k in chosen], [predicted[k] for k in chosen]
        scores = (accuracy_score(y, p), recall_score(y, p, average="macro", zero_division=0))
        return {"labelled": 60 * (1 + (group is None)), "accuracy": scores[0], "recall": scores[1]} | {
            "f1_macro": f1_score(y, p, average="macro", zero_division=0)
        }

    got = window["performance"]
    assert got["overall"] == pytest.approx(expected(None)) and got["groups"]["b"] == pytest.approx(expected("b"))
    assert (
        got["groups"]["a"] == pytest.approx(expected("a"))
        and expected("a")["accuracy"] > 0.8 > expected("b")["accuracy"]
    )
    checks = {c["name"]: c for c in window["checks"]}
    assert checks["accuracy:a"]["status"] == "ok" and checks["accuracy:b"]["status"] == "fail"
    odds = equalized_odds_difference(sent, predicted, groups, positive="0")
    assert checks["equalized_odds_difference"]["value"] == pytest.approx(odds)
    metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    series = re.compile(r"^ray_steward_monitor_performance\{([^}]*)\} (\S+)$", re.M)

    def exported():
        text = urllib.request.urlopen(metrics_url).read().decode()
        found = {tags: float(v) for tags, v in series.findall(text) if 'deployment="labelled"' in tags}
        return [v for tags, v in found.items() if 'group="b"' in tags and 'metric="accuracy"' in tags]

    assert wait_for(exported, 60, "the performance gauge") == [pytest.approx(expected("b")["accuracy"])]


def texts(spec):
    from steward.data.prepare import _tables

    columns, tables = _tables(spec)
    return [str(t) for role in ("validation", "test") for t in tables[role][columns.input]]


def test_traffic_poisoned_to_overflow_the_model_alerts_itself_and_cannot_hide_drift(tmp_path, ports):
    monitor = {"drift": {"min_records": 100}, "window": {"size": 200}, "alerts": {"consecutive_windows": 2}}
    monitor |= {"push_interval_s": 0.3, "max_invalid_rate": 0.01}
    spec, _, url = monitored(tmp_path, ports, "quickstart.yaml", monitor, prefix="/poisoned")
    images, _ = digits(spec)
    rng = np.random.default_rng(1)  # its own: the other tests' draws stay as they were
    noisy = [
        np.clip(images[i] + rng.normal(0, 6, images[i].shape), 0, 16).tolist()
        for i in rng.integers(0, len(images), 600)
    ]
    overflowing = (images[0] * 0 + 3e38).tolist()  # finite, and overflows inside the CNN
    for i in range(0, 600, 40):  # 2.5% of the records: one poisoned request after every 40 drifted records
        send(url, noisy[i : i + 40])
        refused = requests.post(f"{url}/predict", json={"instances": [overflowing]}, timeout=60)
        assert refused.status_code == 422 and refused.json()["field"] == "instances[0]", refused.text
    # drifted traffic alerts after its 2 windows as it does unpoisoned; the poison raises an alert of its own
    assert "mmd:embedding" in {a["name"] for a in alerts_of(url, "drift")}
    (invalid,) = alerts_of(url, "input")
    assert invalid["name"] == "invalid_rate" and invalid["value"] > 0.01
    # the 600 answered records, and the 15 refused ones apart: invalid records never fill a window
    state = wait_for(lambda: (r := report(url))["records"] == 600 and r, 30, "the 600 answered records counted")
    assert sum(w["invalid_records"] for w in state["recent"]) + state["current"]["invalid_records"] == 15
    metrics_url = f"http://127.0.0.1:{ports['metrics']}/metrics"
    series = re.compile(r'^ray_steward_monitor_invalid_rate\{[^}]*deployment="poisoned"', re.M)
    wait_for(lambda: series.search(urllib.request.urlopen(metrics_url).read().decode()), 60, "the invalid rate metric")


def test_text_vocabulary_shift_raises_drift_and_feedback_labels_count(tmp_path, ports):
    monitor = {"drift": {"min_records": 100}, "window": {"size": 250}, "push_interval_s": 0.3, "feedback_rate": 10}
    spec, run_dir, url = monitored(
        tmp_path, ports, "text-transformer.yaml", monitor, "data.options.num_samples=2500", prefix="/text-watched"
    )
    clean = texts(spec)
    # three windows' worth for two: a window closes at the first push that fills it, and the first one, while the new
    # monitor actor starts, may take more than its size
    ids = send(url, [clean[i] for i in RNG.integers(0, len(clean), 750)])
    first = windows_closed(url, 2)
    assert first["alerts"] == [], first["alerts"]
    assert {"psi:text.length", "psi:text.unk_rate", "mmd:embedding"} <= {
        c["name"] for c in first["recent"][-1]["checks"]
    }

    check_feedback(url, ids)

    # New vocabulary: every word replaced by one the tokenizer never saw.
    words = ["".join(RNG.choice(list("qxzjvkw"), 7)) for _ in range(200)]
    shifted = [
        " ".join(RNG.choice(words, len(t.split()))) for t in (clean[i] for i in RNG.integers(0, len(clean), 600))
    ]
    send(url, shifted)
    alerts = wait_for(lambda: report(url)["alerts"], 60, "a drift alert")
    assert {a["name"] for a in alerts} & {"psi:text.unk_rate", "mmd:embedding", "psi:text.length"}, alerts


def test_each_replica_is_told_its_share_of_the_open_window_less_what_it_pushed(tmp_path, ports):
    """The monitor's reply to a push: the replica's share of the open count window (split over the replicas pushing)
    less what it already pushed into it, and its share of a whole window."""
    import ray

    from steward.monitor.actor import MonitorTarget, monitor_actor
    from steward.monitor.bins import Bins
    from steward.monitor.window_state import WindowState
    from steward.spec import load_job

    job = load_job(JOBS / "quickstart.yaml", ["monitor.window.size=200"])
    actor = monitor_actor(MonitorTarget("shares", str(tmp_path), job.monitor))  # no reference: nothing to judge

    seqs: dict[str, int] = {}

    def push(n, replica):
        state = WindowState(Bins())
        state.add_batch(["0"] * n, ["a"] * n)
        seq = seqs[replica] = seqs.get(replica, 0) + 1
        reply = ray.get(actor.push.remote([(seq, state)], replica, seq, seq))
        return reply.push_at, reply.share

    # (share of the open window less what this replica pushed into it, share of a whole window)
    assert push(50, "replica-1") == (150, 200)  # alone: all of it
    assert push(50, "replica-2") == (50, 100)  # two replicas: half each
    assert push(120, "replica-1") == (100, 100)  # closed at 220: half of the next 200
    assert push(30, "replica-2") == (70, 100)
    # not half of the 110 the window still needs: replica-2's 70 to come are its part of those
    assert push(60, "replica-1") == (40, 100)
    # its share spent, replica-1 pushes next at its share of the next window, capped at what this one still needs
    assert push(40, "replica-1") == (70, 100)
    assert ray.get(actor.report.remote())["windows_closed"] == 1
    ray.kill(actor)

    # a deployment of two replicas: the first to push, before the other has, is told half the window, not all of it
    pair = job.serve.model_copy(update={"autoscaling": None, "num_replicas": 2})
    actor = monitor_actor(MonitorTarget("shares-pair", str(tmp_path), job.monitor, min_replicas=pair.replica_range[0]))
    assert push(50, "replica-1") == (50, 100)
    ray.kill(actor)


def test_waiting_predictions_are_saved_apart_and_a_restarted_monitor_matches_their_late_labels(tmp_path, ports):
    """state.json holds the statistics (every persist_interval_s); pending.json the predictions waiting for a label
    (every pending_persist_interval_s: they outweigh the statistics many times over)."""
    import ray

    from steward.monitor.actor import NAMESPACE, MonitorTarget, actor_name, monitor_actor, monitor_folder
    from steward.monitor.bins import Bins
    from steward.monitor.window_state import WindowState
    from steward.spec import load_job

    overrides = ["monitor.persist_interval_s=0.2", "monitor.pending_persist_interval_s=1.5"]
    job = load_job(JOBS / "quickstart.yaml", [*overrides, "monitor.window.size=1000"])
    actor = monitor_actor(MonitorTarget("labels", str(tmp_path), job.monitor))
    folder = monitor_folder(tmp_path, "labels")
    state = WindowState(Bins())
    state.add_batch(["0", "1", "0"], ["a", "b", "a"], t=1.0, request_ids=["r1", "r2", "r3"])
    ray.get(actor.push.remote([(1, state)], "replica-1", 1, 1))
    saved = wait_for(
        lambda: (folder / "state.json").exists() and json.loads((folder / "state.json").read_text()),
        10,
        "the statistics saved",
    )
    assert saved["records"] == 3 and "pending_predictions" not in saved["windows"]["pane"]
    assert not (folder / "pending.json").exists()  # not yet: its own, longer interval
    pending = wait_for(
        lambda: (folder / "pending.json").exists() and json.loads((folder / "pending.json").read_text()),
        10,
        "the waiting predictions saved",
    )
    assert pending["pending_predictions"]["ids"] == ["r1", "r2", "r3"]
    ray.kill(actor, no_restart=False)  # a crash: Ray restarts the actor, which resumes from both files
    restarted = ray.get_actor(actor_name("labels", tmp_path), namespace=NAMESPACE)
    assert wait_for(lambda: ray.get(restarted.report.remote())["records"] == 3, 30, "the restarted monitor")
    key = ray.get(restarted.request_id_key.remote())
    assert ray.get(restarted.feedback.remote("r2", "1")) == "matched"  # a prediction made before the crash
    assert ray.get(restarted.feedback.remote("r9", "1")) == "waiting"  # nothing to match yet
    assert ray.get(restarted.feedback.remote("r2", "0")) == "duplicate"  # one label a prediction

    # which predictions had their label is saved with the waiting ones: a second crash still refuses the duplicate
    wait_for(lambda: "r2" in json.loads((folder / "pending.json").read_text())["labelled"], 10, "labels saved")
    ray.kill(restarted, no_restart=False)
    again = ray.get_actor(actor_name("labels", tmp_path), namespace=NAMESPACE)
    assert ray.get(again.feedback.remote("r2", "1")) == "duplicate"
    assert ray.get(again.request_id_key.remote()) == key and len(key) == 32  # old ids stay valid
    assert (folder / "request-ids.key").stat().st_mode & 0o077 == 0  # readable by its owner only
    ray.kill(again, no_restart=True)


def test_two_serve_replicas_close_windows_near_their_size_with_a_push_each(tmp_path, ports):
    """Two real replicas under concurrent traffic: each pushes its share of the open window, so windows close near
    their size with about one push per replica, and once traffic stops every answered record is counted."""
    size, per_request = 200, 10
    monitor = {"drift": {}, "window": {"size": size}, "push_interval_s": 5}  # timer pushes rare: shares do the work
    spec, _, url = monitored(tmp_path, ports, "quickstart.yaml", monitor, prefix="/pair", replicas=2)
    images, _ = digits(spec)
    wait_for(lambda: requests.get(f"{url}/monitor", timeout=30).status_code == 200, 60, "the monitor")
    answered = []

    def client(k):
        for i in range(k, 120, 4):
            instances = [x.tolist() for x in images[i : i + per_request]]
            reply = requests.post(f"{url}/predict", json={"instances": instances}, timeout=60)
            assert reply.status_code == 200, reply.text
            answered.append(per_request)

    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    sent = sum(answered)
    state = wait_for(lambda: (r := report(url))["records"] == sent and r, 30, f"all {sent} records counted")
    assert state["replicas"] == 2  # both replicas pushed
    closed = [w["records"] for w in state["recent"]]
    assert len(closed) == state["windows_closed"] >= 3 and sum(closed) <= sent, state
    # a window closes at the first push that fills it: at most a replica's share (half of it) plus a request over
    assert all(size <= n <= size + size // 2 + per_request for n in closed), closed
    # a push per replica per window, plus the first pushes (a quarter window, before any reply) and the last ones
    assert state["pushes"] <= 2 * state["windows_closed"] + 8, state["pushes"]
    # and monitors yield the CPU to serving: every thread of every monitor actor's process runs at a lower priority
    monitors = own_processes("ray::Monitor")  # this test's own Ray's monitor actors, never another job's
    assert monitors
    for pid in monitors:
        assert {os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")} == {NICE}


def replica_actor(url):
    """The Serve replica actor that answered /info."""
    import ray

    replica = requests.get(f"{url}/info", timeout=30).json()["replica"]["id"]
    [name] = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if replica in a["name"]]
    return ray.get_actor(name, namespace="serve")


def test_a_killed_replica_loses_at_most_an_interval_and_a_killed_monitor_nothing(tmp_path, ports):
    """32 clients stream; a replica is killed, then the monitor actor. The replica's unpushed records are lost (at
    most push_interval_s of them); the monitor's are not: replicas send again what it had not saved, once each, and
    predictions made before the crash still match their late labels."""
    import ray

    from steward.monitor.actor import NAMESPACE, actor_name

    push, persist = 0.5, 1.0
    monitor = {"drift": {}, "window": {"size": 1_000_000}, "push_interval_s": push, "persist_interval_s": persist}
    monitor["pending_persist_interval_s"] = 30  # predictions made in the last 30 s are only in replicas' resends
    spec, run_dir, url = monitored(tmp_path, ports, "quickstart.yaml", monitor, prefix="/durable")
    images, _ = digits(spec)
    answered: list[tuple[float, str]] = []  # (when it came back, request id) of each answered record
    stop = threading.Event()

    def stream():
        while not stop.is_set():
            try:
                reply = requests.post(f"{url}/predict", json={"instances": [images[0].tolist()]}, timeout=10)
            except requests.RequestException:
                continue
            if reply.status_code == 200:
                answered.append((time.monotonic(), reply.json()["predictions"][0]["request_id"]))

    senders = [threading.Thread(target=stream) for _ in range(32)]
    for sender in senders:
        sender.start()
    wait_for(lambda: len(answered) > 300, 60, "traffic")
    killed_replica = time.monotonic()
    ray.kill(replica_actor(url), no_restart=True)
    wait_for(lambda: answered[-1][0] > killed_replica + 1, 120, "a new replica answering")
    wait_for(lambda: len(answered) > 1500, 60, "more traffic")
    killed_monitor = time.monotonic()
    ray.kill(ray.get_actor(actor_name("durable", run_dir), namespace=NAMESPACE), no_restart=False)  # Ray restarts it
    wait_for(lambda: answered[-1][0] > killed_monitor + 2, 60, "traffic after the monitor restart")
    stop.set()
    for sender in senders:
        sender.join()

    def counted():
        before = report(url)["records"]
        time.sleep(2 * push)
        return report(url)["records"] == before and before  # settled: every replica has pushed

    records = wait_for(counted, 30, "the monitor to settle")
    sent = len(answered)
    lost_with_the_replica = sum(killed_replica - push - 0.2 < t <= killed_replica for t, _ in answered)
    assert sent - lost_with_the_replica <= records <= sent, (sent, records, lost_with_the_replica)
    # a prediction answered a moment before the monitor died, after its last save, still meets its label
    before_crash = [rid for t, rid in answered if killed_monitor - 0.5 < t <= killed_monitor]
    labels = [
        requests.post(f"{url}/feedback", json={"request_id": r, "label": "0"}, timeout=30) for r in before_crash[:20]
    ]
    matched = [label.json()["matched"] for label in labels]
    assert matched and all(matched), matched
    assert (run_dir / "monitor" / "durable" / "state.json").exists()


def test_monitor_report_from_a_persisted_state_of_an_int8_deployment(tmp_path, ports):
    """Served in int8, the deployment is judged against the int8 model's own reference (model/int8/, saved with the
    gate), which the report's histograms use too."""
    from typer.testing import CliRunner

    from steward.cli import app

    monitor = {"drift": {"min_records": 50}, "window": {"size": 100}, "persist_interval_s": 0.5, "push_interval_s": 0.2}
    spec, run_dir, url = monitored(
        tmp_path, ports, "quickstart.yaml", monitor, prefix="/reported", quantize="int8", quantize_tolerance=1.0
    )  # the gate is not what this test is about
    images, _ = digits(spec)
    send(url, [np.clip(x + RNG.normal(0, 4, x.shape), 0, 16).tolist() for x in images[:300]])
    state = run_dir / "monitor" / "reported" / "state.json"
    saved_doc = lambda: state.exists() and json.loads(state.read_text())  # noqa: E731
    doc = wait_for(lambda: (d := saved_doc()) and d["records"] == 300 and len(d["history"]) >= 2 and d, 30, "a state")
    assert doc["reference"] == "model/int8" and (run_dir / "model" / "int8" / "reference.npz").exists()
    time.sleep(2 * 0.5)  # the last window's judgement, saved within a persist interval of it
    saved = state.stat().st_mtime_ns
    time.sleep(4 * 0.5)  # four persist intervals without traffic
    assert state.stat().st_mtime_ns == saved, "an idle monitor rewrote its state"
    out = CliRunner().invoke(app, ["monitor", "report", str(run_dir), "--out", str(tmp_path / "report")])
    assert out.exit_code == 0, out.output
    page = (tmp_path / "report" / "report.html").read_text()
    assert "psi:prediction.class" in page and "mmd:embedding" in page
    for image in ("drift.png", "selection_rates.png", "hist.png"):
        assert (tmp_path / "report" / image).stat().st_size > 1000, image
    missing = CliRunner().invoke(app, ["monitor", "report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no monitor state" in missing.output


def test_stopping_a_deployment_sends_what_its_replicas_hold_and_saves_the_monitor(tmp_path, ports):
    """`steward serve stop`, and Ctrl-C on an embedded `steward serve`, lose no record: each replica pushes what it
    counted as Serve stops it, then the monitor saves both ways before it is stopped."""
    from steward.serve.deploy import stop

    # nothing is pushed while serving: no timer push in the test's time, and 100 records are under a share
    monitor = {"push_interval_s": 60, "window": {"size": 1000}}
    spec, run_dir, url = monitored(tmp_path, ports, "quickstart.yaml", monitor, prefix="/stopped")
    images, _ = digits(spec)
    ids = send(url, [x.tolist() for x in images[:100]])
    stop("stopped", None, spec.output_dir)
    folder = run_dir / "monitor" / "stopped"
    assert json.loads((folder / "state.json").read_text())["records"] == 100
    assert sorted(json.loads((folder / "pending.json").read_text())["pending_predictions"]["ids"]) == sorted(ids)
    audited = audit.history(audit.log_path(spec.output_dir), deployment="stopped")
    assert audited[-1]["event"] == "deployment.stopped"
