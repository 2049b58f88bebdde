"""End-to-end on a real two-node Ray cluster (cluster/local-up.sh: a head and a worker raylet on loopback, 1 CPU
each): jobs go in through the Ray Jobs API with `steward submit`, exactly as on a remote cluster.

One cluster for the module (ports and temp dir of its own, so it never meets another Ray on the machine); it is
torn down in the fixture's finally, whatever happened.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from steward.cli import app
from steward.cluster.jobs import client, job_info, logs
from tests.conftest import JOBS, ROOT
from tests.serving import validation_inputs, wait_for

pytestmark = pytest.mark.slow

PORTS = {"STEWARD_GCS_PORT": "6490", "STEWARD_DASHBOARD_PORT": "8285", "STEWARD_CLIENT_PORT": "10021",
         "STEWARD_HEAD_PORTS": "13400", "STEWARD_WORKER_PORTS": "13600"}  # fmt: skip
API = f"http://127.0.0.1:{PORTS['STEWARD_DASHBOARD_PORT']}"
SERVE_PORT = 8395
# torch's AdamW inside DeepSpeed's ZeRO-2 (the optimizer DeepSpeed wraps, not what this test is about): DeepSpeed's
# own CPU FusedAdam is a JIT-built op that took minutes to build on the loaded 2-core machine.
TORCH_ADAM = ["--set", "distributed.deepspeed_overrides.optimizer.params.torch_adam=true"]
QUICK = ["--set", "train.epochs=2", *TORCH_ADAM]


def cluster_env(temp):
    bin_dir = Path(sys.executable).parent  # the cluster's python is this one: jobs use --deps preinstalled
    return {**os.environ, **PORTS, "STEWARD_CLUSTER_TEMP": str(temp), "STEWARD_RAY": str(bin_dir / "ray"),
            "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT / "platform")}  # fmt: skip


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    temp = Path(f"/tmp/stw-t{os.getpid()}")  # short: Ray's unix sockets live under it
    env = cluster_env(temp)
    try:
        subprocess.run([ROOT / "cluster" / "local-up.sh"], env=env, check=True, capture_output=True, timeout=180)
        # worker_port: the node manager port of the worker node now up (a node-loss test replaces it).
        yield {
            "env": env,
            "storage": tmp_path_factory.mktemp("cluster-runs"),
            "worker_port": PORTS["STEWARD_WORKER_PORTS"],
        }
    finally:
        subprocess.run([ROOT / "cluster" / "local-down.sh"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)  # session logs; kept until here for a failed test's post-mortem


def submit(cluster, job, *args):
    """`steward submit` against the cluster; returns (exit code, output, submission id)."""
    argv = ["submit", str(JOBS / job), "--address", API, "--deps", "preinstalled", "--storage", str(cluster["storage"])]
    out = CliRunner().invoke(app, [*argv, *args])
    job_id = next((w for w in out.output.split() if w.startswith("steward-")), None)
    return out.exit_code, flat(out.output), job_id


def flat(text):
    """Output with the console's line wrapping undone (an 80-column terminal under CliRunner)."""
    return " ".join(text.split())


def actor_nodes(job_id, class_name):
    """The node ids Ray reports for the job's actors of `class_name` (alive or dead)."""
    from ray.util.state import list_actors

    ray_job_id = job_info(API, job_id).job_id
    actors = list_actors(address=API, filters=[("job_id", "=", ray_job_id)], limit=10_000, detail=True)
    return {a.node_id for a in actors if a.class_name == class_name}


def run_folders(cluster, name):
    return sorted((cluster["storage"] / name).glob("*/status.json"))


@pytest.fixture(scope="module")
def trained(cluster):
    """The quickstart (DeepSpeed ZeRO-2, 2 workers) submitted to the cluster; its wall time for the closing note."""
    started = time.perf_counter()
    code, output, job_id = submit(cluster, "quickstart.yaml", "--stage", "train", *QUICK)
    return {"code": code, "output": output, "job_id": job_id, "seconds": time.perf_counter() - started}


def test_deepspeed_job_places_its_workers_on_two_nodes(cluster, trained):
    assert trained["code"] == 0, trained["output"][-3000:]
    print(f"multi-node training job wall time: {trained['seconds']:.1f} s")
    assert len(actor_nodes(trained["job_id"], "RayTrainWorker")) == 2
    (status,) = run_folders(cluster, "quickstart")
    run = status.parent
    assert json.loads(status.read_text())["state"] == "succeeded"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["overall"]["accuracy"] > 0.8  # 2 epochs of the quickstart CNN reach ~0.95 on digits
    starts = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in starts if r["kind"] == "start"] == [2]


def test_missing_resources_are_refused_before_submitting(cluster):
    code, output, _ = submit(cluster, "quickstart.yaml", "--set", "distributed.num_workers=4",
                             "--set", "distributed.use_gpu=true")  # fmt: skip
    assert code == 2
    assert "asks for 4 workers x 1 GPU, the cluster has 0 GPUs" in output
    code, output, _ = submit(cluster, "quickstart.yaml", "--set", "distributed.num_workers=3")
    assert code == 2 and "asks for 3 workers x 1 CPU, the cluster has 2 CPUs" in output


def test_a_failed_job_shows_its_last_log_lines(cluster, tmp_path):
    # Valid here, fails there: serving needs a succeeded run in cluster storage, and this storage has none.
    code, output, job_id = submit(cluster, "quickstart.yaml", "--stage", "serve", "--storage", str(tmp_path))
    assert code == 1
    assert f"job {job_id} FAILED" in output and "last log lines:" in output
    assert "| error: no succeeded run of 'quickstart'" in output
    status = CliRunner().invoke(app, ["jobs", "status", job_id, "--address", API])
    assert status.exit_code == 1 and "no succeeded run of 'quickstart'" in flat(status.output)
    listed = CliRunner().invoke(app, ["jobs", "list", "--address", API])
    assert job_id in listed.output and "FAILED" in listed.output


def test_sweep_runs_trials_on_both_nodes(cluster):
    code, output, job_id = submit(cluster, "tune-digits-asha.yaml", "--stage", "tune", "--set", "tune.num_samples=2",
                                  "--set", "train.epochs=2", "--set", "tune.scheduler={name: fifo}")  # fmt: skip
    assert code == 0, output[-3000:]
    # one single-worker trial per node, side by side: each trains in its Tune trial actor (1 CPU, one per node)
    assert len(actor_nodes(job_id, "with_resources.<locals>.ResourceTrainable")) == 2
    (status,) = run_folders(cluster, "tune-digits-asha")
    rows = (status.parent / "results.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",completed," in row for row in rows)


def worker_raylet(temp, node_manager_port):
    """The pid of the raylet serving node_manager_port in this cluster (checked against its command line)."""
    found = subprocess.run(
        ["pgrep", "-f", "--", f"--node_manager_port={node_manager_port}"], capture_output=True, text=True
    )
    pids = []
    for pid in map(int, found.stdout.split()):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"raylet/raylet") and str(temp).encode() in b" ".join(argv):
                pids.append(pid)
    assert len(pids) == 1, f"expected one raylet on port {node_manager_port} under {temp}, found {pids}"
    return pids[0]


def replace_worker_node(cluster, name, port, before_back=lambda: None):
    """SIGKILL the worker node's raylet (the node is gone, mid-training), call `before_back`, then start `name`."""
    os.kill(worker_raylet(cluster["env"]["STEWARD_CLUSTER_TEMP"], cluster["worker_port"]), signal.SIGKILL)
    before_back()
    up = [ROOT / "cluster" / "local-up.sh", "worker", name, port]
    subprocess.run(up, env=cluster["env"], check=True, capture_output=True, timeout=180)
    cluster["worker_port"] = port


def history(run):
    path = run / "history.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_losing_the_worker_node_mid_training_recovers_from_the_checkpoint(cluster):
    # 12 epochs: the node is lost after epoch 2, and the survivor waits in a collective until the job restarts
    argv = ["--stage", "train", "--set", "train.epochs=12", "--set", "train.early_stopping=null",
            "--set", "distributed.max_failures=1", "--no-wait", *TORCH_ADAM]  # fmt: skip
    before = set(run_folders(cluster, "quickstart"))
    code, output, job_id = submit(cluster, "quickstart.yaml", *argv)
    assert code == 0, output
    status = wait_for(lambda: set(run_folders(cluster, "quickstart")) - before, 120, "the job's run folder").pop()
    run = status.parent
    wait_for(lambda: any(r["kind"] == "epoch" and r["epoch"] >= 2 for r in history(run)), 240, "two epochs")
    replace_worker_node(cluster, "worker2", "13800")
    final = wait_for(lambda: (i := job_info(API, job_id)).ended and i, 420, "the job to end")
    log_text = logs(API, job_id)
    assert str(final.status) == "SUCCEEDED", log_text[-3000:]
    starts = [r for r in history(run) if r["kind"] == "start"]
    assert len(starts) == 2 and starts[1]["epoch"] >= 2 and "checkpoint_" in starts[1]["from"]
    assert max(r["epoch"] for r in history(run) if r["kind"] == "epoch") == 12


def test_losing_a_worker_node_with_no_restarts_left_fails_with_the_fix(cluster):
    argv = ["--stage", "train", "--set", "train.epochs=30", "--set", "train.early_stopping=null",
            "--set", "distributed.max_failures=0", "--no-wait", *TORCH_ADAM]  # fmt: skip
    before = set(run_folders(cluster, "quickstart"))
    code, output, job_id = submit(cluster, "quickstart.yaml", *argv)
    assert code == 0, output
    status = wait_for(lambda: set(run_folders(cluster, "quickstart")) - before, 120, "the job's run folder").pop()
    wait_for(lambda: any(r["kind"] == "epoch" for r in history(status.parent)), 240, "an epoch")

    def job_ended():
        final = wait_for(lambda: (i := job_info(API, job_id)).ended and i, 300, "the job to end")
        assert str(final.status) == "FAILED", logs(API, job_id)[-3000:]

    replace_worker_node(cluster, "worker3", "14000", before_back=job_ended)  # the next tests get two nodes again
    shown = CliRunner().invoke(app, ["jobs", "status", job_id, "--address", API])
    text = flat(shown.output)
    assert shown.exit_code == 1, text
    assert "training failed: a worker was lost" in text and "distributed.max_failures=0" in text, text
    assert "raise distributed.max_failures" in text and "Traceback" not in text, text
    failed = json.loads(status.read_text())
    assert failed["state"] == "failed" and "distributed.max_failures=0" in failed["error"]


def test_serve_on_the_cluster_scales_replicas_across_nodes(cluster, trained):
    assert trained["code"] == 0
    # Both nodes share this host, so one HTTP proxy (on the head) instead of one per node on the same port.
    start = f"serve start --address auto --http-host 127.0.0.1 --http-port {SERVE_PORT} --proxy-location HeadOnly"
    jobs = client(API)
    started = jobs.submit_job(entrypoint=start)
    wait_for(lambda: str(jobs.get_job_status(started)) == "SUCCEEDED", 120, "Serve to start on the cluster")
    fast = ["min_replicas=1", "max_replicas=2", "target_ongoing_requests=1", "upscale_delay_s=1",
            "downscale_delay_s=600", "metrics_interval_s=0.5", "look_back_period_s=1"]  # fmt: skip
    sets = [a for f in fast for a in ("--set", f"serve.autoscaling.{f}")]
    sets += ["--set", "serve.batching=null", "--set", "serve.max_ongoing_requests=4", "--port", str(SERVE_PORT)]
    code, output, job_id = submit(cluster, "quickstart.yaml", "--stage", "serve", *sets)
    assert code == 0, output[-3000:]
    from steward.spec import load_job

    spec = load_job(JOBS / "quickstart.yaml")
    url = f"http://127.0.0.1:{SERVE_PORT}/digits/predict"
    body = {"instances": validation_inputs(spec, 4)}
    first = requests.post(url, json=body, timeout=60)
    assert first.status_code == 200 and len(first.json()["predictions"]) == 4
    stop = threading.Event()
    load = [threading.Thread(target=_keep_busy, args=(url, body, stop), daemon=True) for _ in range(8)]
    for thread in load:
        thread.start()
    try:
        wait_for(lambda: len(replica_nodes()) == 2, 180, "replicas on both nodes under load", every=1.0)
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=30)


def replica_nodes():
    from ray.util.state import list_actors

    actors = list_actors(address=API, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
    return {a.node_id for a in actors if a.class_name.startswith("ServeReplica:")}


def _keep_busy(url, body, stop):
    with requests.Session() as session:
        while not stop.is_set():
            session.post(url, json=body, timeout=60)
