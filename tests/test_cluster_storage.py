"""Run folders in cluster storage: a real S3 API (moto's server on loopback) as output_dir, through the real CLI.

Training writes its run to s3://, Ray Train its checkpoints; `steward runs --storage`, `steward evaluate` and
`steward serve --export` read it back; a bucket that is missing or unreachable is refused with the field named.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from steward.cluster.package import package_job
from steward.spec import load_job
from steward.storage import join
from tests.conftest import JOBS, ROOT

STEWARD = [sys.executable, "-m", "steward"]
BUCKET = "steward-runs"
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}
# One epoch of the quickstart, torch's AdamW inside ZeRO-2 (DeepSpeed's CPU Adam is a minutes-long JIT build).
SMALL = [
    "train.epochs=1",
    "train.early_stopping=null",
    "distributed.deepspeed_overrides.optimizer.params.torch_adam=true",
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port with one bucket; the URI, the CLI's environment, a pyarrow fs."""
    from moto.server import ThreadedMotoServer
    from pyarrow.fs import S3FileSystem

    saved = {k: os.environ.get(k) for k in AWS}
    os.environ.update(AWS)  # this process reads the bucket too (pyarrow, like the CLI, takes keys from the env)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        query = f"?endpoint_override=127.0.0.1:{port}&scheme=http"
        cache = tmp_path_factory.mktemp("steward-cache")
        env = {**os.environ, **AWS, "STEWARD_CACHE": str(cache), "COLUMNS": "250"}
        yield {"uri": f"s3://{BUCKET}/runs{query}", "query": query, "port": port, "env": env, "fs": fs, "cache": cache}
    finally:
        server.stop()
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.update({key: value})


def steward(s3, *args, timeout=900):
    return subprocess.run([*STEWARD, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=s3["env"])  # fmt: skip


def stored(s3, prefix):
    """Every object path under bucket/prefix in the S3 server."""
    from pyarrow.fs import FileSelector, FileType

    infos = s3["fs"].get_file_info(FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/") for i in infos if i.type == FileType.File}


def read(s3, path):
    with s3["fs"].open_input_stream(f"{BUCKET}/{path}") as stream:
        return stream.read().decode()


@pytest.fixture(scope="module")
def trained(s3):
    """The quickstart trained through `steward train` into the bucket: (CLI result, run id)."""
    sets = [a for s in [f"output_dir={s3['uri']}", *SMALL] for a in ("--set", s)]
    out = steward(s3, "train", JOBS / "quickstart.yaml", *sets)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_id,) = {p.split("/")[0] for p in stored(s3, "runs/quickstart")}
    return out, run_id


@pytest.mark.slow
def test_training_writes_its_run_folder_and_checkpoints_to_s3(s3, trained):
    out, run_id = trained
    files = stored(s3, f"runs/quickstart/{run_id}")
    for name in ("spec.yaml", "data_info.json", "history.jsonl", "metrics.json", "model/model.json",
                 "model/model.safetensors", "model/reference.json", "curves.png", "model_card.md"):  # fmt: skip
        assert name in files, (name, sorted(files))
    assert any(f.startswith("train/checkpoint_") for f in files), sorted(files)  # Ray Train wrote them itself
    status = json.loads(read(s3, f"runs/quickstart/{run_id}/status.json"))
    assert status["state"] == "succeeded"
    metrics = json.loads(read(s3, f"runs/quickstart/{run_id}/metrics.json"))
    assert metrics["overall"]["accuracy"] > 0.5  # one epoch of the digits CNN
    epochs = [json.loads(line) for line in read(s3, f"runs/quickstart/{run_id}/history.jsonl").splitlines()]
    assert [r["epoch"] for r in epochs if r["kind"] == "epoch"] == [1]
    assert f"s3://{BUCKET}/runs/quickstart/{run_id}" in " ".join(out.stdout.split())
    assert not (ROOT / "s3:").exists()  # nothing fell through to a local folder named after the scheme


@pytest.mark.slow
def test_runs_lists_the_run_in_s3_with_its_status_and_metric(s3, trained):
    _, run_id = trained
    metrics = json.loads(read(s3, f"runs/quickstart/{run_id}/metrics.json"))
    out = steward(s3, "runs", "--storage", s3["uri"])
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if run_id in line)
    assert "quickstart" in row and "succeeded" in row and f"accuracy={metrics['overall']['accuracy']:.4f}" in row


@pytest.mark.slow
def test_evaluate_and_serve_use_a_run_from_s3(s3, trained, tmp_path):
    _, run_id = trained
    shutil.rmtree(s3["cache"] / "runs")  # nothing staged here: the run must come from the bucket
    metrics = json.loads(read(s3, f"runs/quickstart/{run_id}/metrics.json"))
    run_uri = join(s3["uri"], "quickstart", run_id)
    out = steward(s3, "evaluate", run_uri)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{metrics['overall']['accuracy']:.4f}" in out.stdout
    staged = s3["cache"] / "runs" / "s3" / BUCKET / "runs" / "quickstart" / run_id
    assert (staged / "model" / "model.json").exists() and not (staged / "train").exists()  # checkpoints stay put
    exported = tmp_path / "serve.yaml"
    out = steward(s3, "serve", JOBS / "quickstart.yaml", "--set", f"output_dir={s3['uri']}", "--export", exported)
    assert out.returncode == 0, out.stderr[-3000:]
    assert str(staged) in exported.read_text()  # the newest succeeded run in the bucket, downloaded to serve


def test_a_run_whose_upload_was_cut_short_is_refused(s3):
    # status.json goes last: a run whose upload stopped midway still says `running`, so it is never used.
    run = f"{BUCKET}/runs/quickstart/20260101-000000-cut0"
    s3["fs"].create_dir(f"{run}/model")
    for path, text in {
        f"{run}/status.json": '{"state": "running", "started": 0}',
        f"{run}/model/model.json": "{}",
    }.items():
        with s3["fs"].open_output_stream(path) as out:
            out.write(text.encode())
    out = steward(s3, "evaluate", join(s3["uri"], "quickstart", "20260101-000000-cut0"))
    assert out.returncode == 2 and "the run is running, not succeeded" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_missing_or_unreachable_storage_is_refused_naming_the_field(s3):
    missing = f"s3://no-such-bucket/runs{s3['query']}"
    out = steward(s3, "runs", "--storage", missing)
    assert out.returncode == 2 and "--storage" in out.stderr and "bucket 'no-such-bucket' does not exist" in out.stderr
    unreachable = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{free_port()}&scheme=http"
    out = steward(s3, "train", JOBS / "quickstart.yaml", "--set", f"output_dir={unreachable}")
    assert out.returncode == 2 and "output_dir" in out.stderr and "cannot reach the storage" in out.stderr
    out = steward(s3, "runs", "--storage", "nosuch://bucket/runs")
    assert out.returncode == 2 and "--storage nosuch://bucket/runs: cannot open it" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_sweep_into_a_uri_is_refused_with_the_fix(s3):
    out = steward(s3, "tune", JOBS / "tune-digits-asha.yaml", "--set", f"output_dir={s3['uri']}")
    assert out.returncode == 2 and "shared folder" in out.stderr and "URI output_dir works for train" in out.stderr


def test_a_uri_output_dir_is_packaged_for_the_cluster_as_is(s3):
    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={s3['uri']}"])
    package = package_job(spec, deps="preinstalled")
    try:
        remote = yaml.safe_load((Path(package.workdir) / "spec.yaml").read_text())
        assert remote["output_dir"] == s3["uri"]  # the cluster writes to the bucket, with the same query
    finally:
        package.cleanup()
    with pytest.raises(ValueError, match=r"output_dir nosuch://b/runs: cannot open it"):
        package_job(load_job(JOBS / "quickstart.yaml", ["output_dir=nosuch://b/runs"]), deps="preinstalled")
