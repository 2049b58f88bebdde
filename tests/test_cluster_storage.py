"""Run folders in cluster storage: a real S3 API (moto's server on loopback) as output_dir, through the real CLI.

Training writes its run to s3://, Ray Train its checkpoints; `steward runs --storage`, `steward evaluate` and
`steward serve --export` read it back, `--resume URI` continues it from its checkpoint in the bucket; a bucket that is
missing or unreachable is refused with the field named. Sweeps in cluster storage: test_cluster_storage_tune.py.
"""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from steward.cluster.package import package_job
from steward.errors import StewardError
from steward.spec import load_job
from steward.storage import join
from tests.conftest import BUCKET, JOBS, ROOT, free_port, read, steward, stored

# One epoch of the quickstart, torch's AdamW inside ZeRO-2 (DeepSpeed's CPU Adam is a minutes-long JIT build).
SMALL = [
    "train.epochs=1",
    "train.early_stopping=null",
    "distributed.deepspeed_overrides.optimizer.params.torch_adam=true",
]


def sets(*overrides):
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def trained(s3):
    """The quickstart trained through `steward train` into the bucket: (CLI result, run id)."""
    out = steward(s3, "train", JOBS / "quickstart.yaml", *sets(f"output_dir={s3['uri']}", *SMALL))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (run_id,) = {p.split("/")[0] for p in stored(s3, "runs/quickstart")}
    return out, run_id


@pytest.mark.slow
def test_training_writes_its_run_folder_and_checkpoints_to_s3(s3, trained):
    out, run_id = trained
    files = stored(s3, f"runs/quickstart/{run_id}")
    for name in (
        "spec.yaml",
        "data_info.json",
        "history.jsonl",
        "metrics.json",
        "model/model.json",
        "model/model.safetensors",
        "model/reference.json",
        "curves.png",
        "model_card.md",
    ):
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


def test_a_uri_output_dir_is_packaged_for_the_cluster_as_is(s3):
    spec = load_job(JOBS / "quickstart.yaml", [f"output_dir={s3['uri']}"])
    package = package_job(spec, deps="preinstalled")
    try:
        remote = yaml.safe_load((Path(package.workdir) / "spec.yaml").read_text())
        assert remote["output_dir"] == s3["uri"]  # the cluster writes to the bucket, with the same query
    finally:
        package.cleanup()
    with pytest.raises(StewardError, match=r"output_dir nosuch://b/runs: cannot open it"):
        package_job(load_job(JOBS / "quickstart.yaml", ["output_dir=nosuch://b/runs"]), deps="preinstalled")


# Last in the module: it adds an epoch to the run that the tests above read.
@pytest.mark.slow
def test_train_resumes_the_run_from_s3_at_its_checkpoint(s3, trained):
    _, run_id = trained
    # The spec's own output_dir (runs) is left as is: the run's URI says where it lives and where it goes on.
    run_uri = join(s3["uri"], "quickstart", run_id)
    resumed = steward(s3, "train", JOBS / "quickstart.yaml", *sets(*SMALL, "train.epochs=2"), "--resume", run_uri)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    records = [json.loads(line) for line in read(s3, f"runs/quickstart/{run_id}/history.jsonl").splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]  # epoch 1 was not trained again
    starts = [r for r in records if r["kind"] == "start"]
    assert [s["epoch"] for s in starts] == [0, 1] and "/train/checkpoint_" in starts[1]["from"]
    assert json.loads(read(s3, f"runs/quickstart/{run_id}/status.json"))["state"] == "succeeded"
    files = stored(s3, f"runs/quickstart/{run_id}")
    checkpoints = {f.split("/")[1] for f in files if f.startswith("train/checkpoint_") and f.count("/") > 1}
    assert len(checkpoints) == 2  # the first run's, then the resumed epoch's, beside it in the bucket
    assert not (ROOT / "runs" / "quickstart" / run_id).exists()  # nothing went to the spec's local output_dir
